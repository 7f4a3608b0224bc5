"""What of the guest's widgets and comms a frontend may load: the output policy's comm half.

A frontend makes a widget model of whatever module a comm names, and renders
its state; under the ``safe`` policy (output_policy.py) every comm message
from the guest passes :class:`WidgetPolicy` first:

- widget models load only from ``widget_modules`` (the ``@jupyter-widgets``
  core by default; a frontend would otherwise try to load any module, some
  from a CDN), also through the outer ``model_module`` of ``update_states``;
  the protocol keys (module, model and view names) must be strings and never
  change once a comm is open; a core view must be one the core defines, and
  the value of a view that renders HTML (``HTMLView``, ``HTMLMathView``, on
  whatever model) must be a string and is sanitised; HTML descriptions are
  switched off; media widgets never load a URL (``format="url"``); style and
  layout values call no CSS function that loads (``url()``, ``image-set()``);
  binary buffers replace plain data only; an Output widget's outputs are
  filtered like any other bundle;
- comm_open: ``target_name`` must be a string and ``target_module`` (a script
  classic Notebook loads) empty; the frontend's own widget targets
  (``jupyter.widget.control``/``.version``) are never opened by the guest;
  other targets (libraries' comms) pass to the extensions the host installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from smolvm_kernel.jupyter.markup import sanitize_html

DEFAULT_WIDGET_MODULES = ("@jupyter-widgets/base", "@jupyter-widgets/controls", "@jupyter-widgets/output")
_MODULE_KEYS = ("_model_module", "_view_module")
#: A widget's protocol keys: strings (the ``_view_*`` ones may be None), fixed once the comm is open.
_NAME_KEYS = ("_model_module", "_model_name", "_model_module_version",
              "_view_module", "_view_name", "_view_module_version")
_WIDGET_TARGET = "jupyter.widget"
#: Targets a frontend opens to the kernel, never the other way round.
_FRONTEND_TARGETS = frozenset({"jupyter.widget.control", "jupyter.widget.version"})
#: Views that put their model's ``value`` into innerHTML (@jupyter-widgets/controls).
_HTML_VIEWS = frozenset({"HTMLView", "HTMLMathView"})
#: The views of the @jupyter-widgets core (base, controls, output) of ipywidgets 8;
#: all but _HTML_VIEWS render their data as text, attributes or numbers.
_CORE_VIEWS = _HTML_VIEWS | frozenset({
    "LayoutView", "StyleView", "DOMWidgetView", "WidgetView", "OutputView",
    "AccordionView", "AudioView", "BoxView", "ButtonView", "CheckboxView", "ColorPickerView",
    "ColorsInputView", "ComboboxView", "ControllerAxisView", "ControllerButtonView", "ControllerView",
    "DatePickerView", "DatetimeView", "DropdownView", "FileUploadView", "FloatLogSliderView",
    "FloatRangeSliderView", "FloatSliderView", "FloatTextView", "FloatsInputView", "GridBoxView",
    "HBoxView", "ImageView", "IntRangeSliderView", "IntSliderView", "IntTextView", "IntsInputView",
    "LabelView", "PasswordView", "PlayView", "ProgressView", "RadioButtonsView", "SelectMultipleView",
    "SelectView", "SelectionRangeSliderView", "SelectionSliderView", "StackView", "TabView",
    "TagsInputView", "TextView", "TextareaView", "TimeView", "ToggleButtonView", "ToggleButtonsView",
    "VBoxView", "ValidView", "VideoView"})
#: Their value is HTML for their own views: sanitised whatever view the guest names.
_HTML_MODELS = frozenset({"HTMLModel", "HTMLMathModel"})
_CORE_PREFIX = "@jupyter-widgets/"
#: Shown as text (or an attribute) by every core view: a string, or None.
_TEXT_KEYS = ("description", "tooltip", "placeholder")
#: Keys a binary buffer may never replace (markup, protocol, references, what is checked here).
_NO_BUFFER_KEYS = frozenset({"description", "description_allow_html", "tooltip", "placeholder", "format",
                             "layout", "style", "outputs", "msg_id", "children", "icon", "icons",
                             "tooltips", "titles", "_options_labels"})
_PROTO_KEYS = frozenset({"__proto__", "constructor", "prototype"})
#: CSS functions a style or layout value may call: none of them loads anything.
_CSS_FUNCTIONS = frozenset({"rgb", "rgba", "hsl", "hsla", "hwb", "lab", "lch", "oklab", "oklch", "color",
                            "calc", "min", "max", "clamp", "var", "minmax", "repeat", "fit-content"})
_CSS_CALL = re.compile(r"([a-zA-Z_-][\w-]*)?\s*\(")
_MAX_WIDGETS = 100_000


class WidgetPolicy:
    """Checks the guest's comm_open and comm_msg contents: refused ones are
    dropped, what is refused said through ``refuse``; an Output widget's
    outputs go through ``bundle`` (the display filter)."""

    def __init__(self, widget_modules: Iterable[str], bundle: Callable[..., tuple[dict, dict]],
                 refuse: Callable[[str], None]) -> None:
        self.widget_modules = frozenset(widget_modules)
        self._bundle = bundle
        self._refuse = refuse
        #: comm_id -> the protocol keys (_model_name, _view_name, ...) the guest's widget opened with.
        self.widgets: dict[str, dict] = {}
        #: comm_ids of the guest's comms to other targets than jupyter.widget.
        self.other_comms: set[str] = set()

    def comm_open(self, content: dict) -> dict | None:
        """The comm_open's content to relay (changed in place), or None to drop it."""
        target = content.get("target_name")
        if not isinstance(target, str):
            return self._refuse(f"a comm whose target_name is not a string ({_short(target)})")
        if content.get("target_module") not in (None, ""):
            # Classic Notebook loads it as a require.js module: a script from anywhere.
            return self._refuse(f"a comm with target_module {_short(content['target_module'])}")
        comm_id = content.get("comm_id")
        if not isinstance(comm_id, str):
            return self._refuse("a comm whose comm_id is not a string")
        if comm_id in self.widgets or comm_id in self.other_comms:
            # A second open would swap what the id's later messages are checked as.
            return self._refuse(f"a second comm_open of comm {_short(comm_id)}")
        if target in _FRONTEND_TARGETS:
            return self._refuse(f"a {target} comm (only a frontend opens one)")
        if target != _WIDGET_TARGET:
            # Another library's comm: only a frontend extension the host installed reads it.
            if len(self.other_comms) >= _MAX_WIDGETS:
                return self._refuse("too many comms")
            self.other_comms.add(comm_id)
            return content
        data = content.get("data")
        if isinstance(data, dict) and "state" not in data and "buffer_paths" not in data:
            return content     # no model can be made of it (a frontend fails on data.state)
        state = data.get("state") if isinstance(data, dict) else None
        if not isinstance(state, dict):
            return self._refuse("a widget with a malformed state")
        error = self._names_error(state, None)
        record = None
        if error is None:
            record = self._record(comm_id, state)
            if record is None:
                error = "a widget without a model module and name"
        error = error or self._state_error(state, record) or self._buffers_error(data.get("buffer_paths"), record)
        if error:
            self.widgets.pop(comm_id, None)
            return self._refuse(error)
        return content

    def comm_msg(self, content: dict) -> dict | None:
        """The comm_msg's content to relay (changed in place), or None to drop it."""
        comm_id = content.get("comm_id")
        if comm_id in self.other_comms:
            return content
        data = content.get("data")
        if not isinstance(data, dict):
            return content
        if data.get("method") == "update_states":
            return self._update_states(data, content)
        state = data.get("state")
        if state is None and "buffer_paths" not in data:
            return content        # "custom" messages and the like: no state
        if not isinstance(state, dict) or not isinstance(comm_id, str):
            return self._refuse("a malformed widget update")
        record = self.widgets.get(comm_id)
        error = self._names_error(state, record)
        if error is None and record is None:
            # A full state for a comm the frontend opened (request_state's answer).
            record = self._record(comm_id, state)
            if record is None:
                error = "an update for a widget the microVM never opened"
        error = error or self._state_error(state, record) or self._buffers_error(data.get("buffer_paths"), record)
        return self._refuse(error) if error else content

    def _names_error(self, state: dict, record: dict | None) -> str | None:
        """Why the protocol keys of ``state`` are refused (None if they are not);
        ``record`` is what the comm's earlier messages set."""
        for key in _NAME_KEYS:
            if key not in state:
                continue
            value = state[key]
            if not (isinstance(value, str) or (value is None and key.startswith("_view"))):
                return f"a widget whose {key} is not a string"
            if record is not None and value != record.get(key):
                return f"a change of a widget's {key} (to {_short(value)})"
        names = {**(record or {}), **{k: state[k] for k in _NAME_KEYS if k in state}}
        modules = [names.get(k) for k in _MODULE_KEYS]
        if any(m not in (None, "") and m not in self.widget_modules for m in modules):
            return self._module_refusal(f"{_short(modules[0])} / {_short(modules[1])}")
        view, view_module = names.get("_view_name"), names.get("_view_module")
        if view not in (None, ""):
            if view_module in (None, ""):
                return f"a widget view {_short(view)} without a module"
            if view_module.startswith(_CORE_PREFIX) and view not in _CORE_VIEWS:
                return f"a widget view {_short(view)} that {view_module} does not define"
        return None

    def _module_refusal(self, modules: str) -> str:
        return (f"a widget from module {modules}: only {', '.join(sorted(self.widget_modules))} are "
                f"loaded from the microVM (SandboxConfig.widget_modules adds others)")

    def _state_error(self, state: dict, record: dict) -> str | None:
        """Why a widget's ``state`` (changed in place) is refused, or None."""
        if "description_allow_html" in state:
            state["description_allow_html"] = False
        for key in _TEXT_KEYS:
            if key in state and not (state[key] is None or isinstance(state[key], str)):
                return f"a widget whose {key} is not a string"
        if "value" in state and _renders_html(record):
            # The view, not the model, decides: any model shown by HTMLView renders HTML.
            if not isinstance(state["value"], str):
                return f"an HTML widget ({record.get('_view_name')}) whose value is not a string"
            state["value"] = sanitize_html(state["value"])
        if state.get("format") == "url":
            return 'a media widget that loads a URL (format="url")'
        model = record.get("_model_name")
        if isinstance(model, str) and (model.endswith("StyleModel") or model == "LayoutModel"):
            for key, value in state.items():
                if isinstance(key, str) and key.startswith("_") or value is None or \
                        isinstance(value, (bool, int, float)):
                    continue
                if not isinstance(value, str) or not _css_ok(value):
                    return f"a widget style {_short(key)}={_short(value)} (it could load a URL)"
        outputs = state.get("outputs")
        if "outputs" in state and not isinstance(outputs, list):
            return "an Output widget whose outputs are not a list"
        for out in outputs or ():
            if not isinstance(out, dict):
                return "an Output widget with a malformed output"
            if "data" in out:
                out["data"], out["metadata"] = self._bundle(out.get("data"), out.get("metadata"))
        return None

    def _buffers_error(self, paths, record: dict, prefix: tuple = ()) -> str | None:
        """Why ``buffer_paths`` are refused: a buffer (a DataView in the frontend)
        replaces plain data only, never a protocol key, markup or a reference."""
        if paths is None:
            return None
        if not isinstance(paths, list):
            return "malformed buffer_paths"
        for path in paths:
            if not _buffer_path_ok(path, record, prefix):
                return f"a binary buffer at {_short(path)}"
        return None

    def _record(self, comm_id: str, state: dict, outer: dict | None = None) -> dict | None:
        names = {k: state.get(k) for k in _NAME_KEYS}
        if outer is not None:
            names["_model_module"] = outer["model_module"]
            names["_model_name"] = outer["model_name"]
        if not (isinstance(names["_model_module"], str) and isinstance(names["_model_name"], str)):
            return None
        if len(self.widgets) >= _MAX_WIDGETS:
            return None
        self.widgets[comm_id] = names
        return names

    def _update_states(self, data: dict, content: dict) -> dict | None:
        """The control comm's answer: each entry becomes a model in the frontend,
        of the OUTER model_module/model_name, with the inner state."""
        states = data.get("states")
        if not isinstance(states, dict):
            return self._refuse("a malformed update_states")
        for widget_id, entry in list(states.items()):
            error = self._entry_error(widget_id, entry)
            if error:
                states.pop(widget_id)
                self._refuse(error)
        paths = data.get("buffer_paths")
        if paths is not None:
            if not isinstance(paths, list):
                return self._refuse("malformed buffer_paths")
            for path in paths:
                # [widget_id, "state", key, ...]: put into that entry's state by the frontend,
                # which ignores the paths of widgets not in states (such as those refused above).
                if not isinstance(path, list) or not path or not isinstance(path[0], str) or \
                        path[0] in _PROTO_KEYS:
                    return self._refuse(f"a binary buffer at {_short(path)}")
                if path[0] in states and not _buffer_path_ok(path[1:], self.widgets[path[0]], ("state",)):
                    return self._refuse(f"a binary buffer at {_short(path)}")
        return content

    def _entry_error(self, widget_id, entry) -> str | None:
        st = entry.get("state") if isinstance(entry, dict) else None
        if not isinstance(widget_id, str) or not isinstance(st, dict):
            return "a malformed widget in update_states"
        outer = {k: entry.get(k) for k in ("model_module", "model_name", "model_module_version")}
        record = self.widgets.get(widget_id)
        if all(k not in entry for k in outer) and "_model_module" not in st and "_model_name" not in st:
            # No module, no model: a frontend makes no model of it, and sets the
            # state of one it has (whose record is checked against the state).
            return None if record is None else self._names_error(st, record) or self._state_error(st, record)
        if not all(isinstance(v, str) for v in outer.values()):
            return "a widget in update_states whose model_module/model_name/version is not a string"
        if outer["model_module"] not in self.widget_modules:
            return self._module_refusal(_short(outer["model_module"]))
        for key in ("model_module", "model_name", "model_module_version"):
            if f"_{key}" in st and st[f"_{key}"] != outer[key]:
                return f"a widget in update_states whose {key} and state._{key} differ"
        if record is not None:
            if (record["_model_module"], record["_model_name"]) != (outer["model_module"], outer["model_name"]):
                return "a change of a widget's model in update_states"
            return self._names_error(st, record) or self._state_error(st, record)
        error = self._names_error(st, None)
        if error:
            return error
        record = self._record(widget_id, st, outer)
        if record is None:
            return "too many widgets"
        error = self._state_error(st, record)
        if error:
            self.widgets.pop(widget_id, None)
        return error


def _short(value) -> str:
    """``value`` for a note: the guest's, so short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _css_ok(value: str) -> bool:
    """A CSS value that calls no function but those that load nothing (url(), image-set(), ...)."""
    if "\\" in value:       # an escape could spell url( as u\72l(
        return False
    return all(m.group(1) is None or m.group(1).lower() in _CSS_FUNCTIONS for m in _CSS_CALL.finditer(value))


def _buffer_path_ok(path, record: dict, prefix: tuple = ()) -> bool:
    """A buffer path (after ``prefix``) into a widget's state that names plain data."""
    if not isinstance(path, list) or len(path) <= len(prefix) or tuple(path[:len(prefix)]) != prefix:
        return False
    path = path[len(prefix):]
    if not all((isinstance(p, str) and p not in _PROTO_KEYS) or type(p) is int for p in path):
        return False
    key = path[0]
    if not isinstance(key, str) or key.startswith("_") or key in _NO_BUFFER_KEYS:
        return False
    return not (key == "value" and _renders_html(record))


def _renders_html(record: dict) -> bool:
    return record.get("_view_name") in _HTML_VIEWS or record.get("_model_name") in _HTML_MODELS
