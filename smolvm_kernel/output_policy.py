"""What of the guest's output a frontend may render: the browser is part of the trust boundary.

A frontend renders a kernel's outputs in the Jupyter origin as trusted
output of the user's own session: a ``<script>``, an ``onerror`` handler, a
JavaScript output or an unknown widget module from the VM would run with the
user's Jupyter session (contents API, terminals) and the browser's network,
around the VM. Under the ``safe`` policy (the default) every bundle from the
guest is filtered before any frontend sees it:

- only known-safe mime types pass (text, images, JSON, widget views, and
  those the host adds with ``output_allow_mimes``); executable or unknown ones
  (``application/javascript``, Bokeh's and HoloViews' exec types, ...) are
  replaced by a short visible note that says how to allow them;
- ``text/html`` and the raw HTML in ``text/markdown`` are sanitised with nh3
  (the Ammonia sanitiser): no scripts, event handlers, forms, iframes, styles,
  ``data-*`` attributes (JupyterLab's commandlinker runs commands from those),
  ``javascript:`` or relative links, and images only from ``data:`` URLs (an
  ``<img src=https://...>`` would carry guest data out through the browser);
- ``image/svg+xml`` becomes an ``<img>`` of the SVG as a data URL, in which a
  browser runs no script; LaTeX that links anywhere but http(s) is shown as text;
- widget models load only from ``widget_modules`` (the ``@jupyter-widgets``
  core by default; a frontend would otherwise try to load any module, some
  from a CDN); HTML widget values are sanitised, HTML descriptions switched
  off, and an Output widget's outputs filtered like any other bundle;
- ``set_next_input`` and pager payloads never put a ``%smolvm`` line (which
  runs on the host) into the user's next cell; pager bundles are filtered;
- ``input_request`` prompts say that the VM is asking.

``trusted`` passes everything through (one user who trusts the code they run).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

#: Rendered by frontends without running anything the bundle carries.
SAFE_MIMES = frozenset({
    "text/plain", "text/html", "text/markdown", "text/latex", "image/png", "image/jpeg", "image/gif",
    "image/webp", "image/bmp", "image/svg+xml", "application/json",
    "application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.stdout",
    "application/vnd.jupyter.stderr",
})
DEFAULT_WIDGET_MODULES = ("@jupyter-widgets/base", "@jupyter-widgets/controls", "@jupyter-widgets/output")
#: Widget models whose ``value`` a frontend renders as HTML.
_HTML_VALUE_MODELS = frozenset({"HTMLModel", "HTMLMathModel"})
_MODULE_KEYS = ("_model_module", "_view_module")
_URL_SCHEMES = {"http", "https", "mailto", "data"}   # data: only for images, see _keep_attribute
_MD_BAD_LINK = re.compile(r"\]\(\s*<?\s*(?!https?:|mailto:|#)[a-zA-Z][\w+.-]*:", re.IGNORECASE)
_MD_RAW_HTML = re.compile(r"<\s*[a-zA-Z!/?]")
_LATEX_LINK = re.compile(r"\\(?:href|url)\s*\{\s*(?!https?:)", re.IGNORECASE)
_LATEX_HTML = re.compile(r"\\(?:class|cssId|style|html|unicode|require)\b")
_HOST_LINE = re.compile(r"^\s*%+smolvm\b", re.MULTILINE)


#: Mime types whose value a frontend renders as markup: a string (or a list of strings) only.
_TEXT_MIMES = frozenset({"text/plain", "text/html", "text/markdown", "text/latex", "image/svg+xml"})


def _text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    return None


def _keep_attribute(element: str, attribute: str, value: str) -> str | None:
    is_data = value.strip().lower().startswith("data:")
    if attribute == "src":
        return value if is_data and value.strip().lower().startswith("data:image/") else None
    return None if is_data else value


def sanitize_html(html: str) -> str:
    """``html`` without anything that runs or reaches out (see the module docstring)."""
    import nh3

    return nh3.clean(html, url_schemes=_URL_SCHEMES, attribute_filter=_keep_attribute,
                     url_relative="deny", clean_content_tags={"script", "style"})


def sanitize_markdown(text: str) -> str:
    """Markdown whose raw HTML is sanitised and whose links go nowhere but http(s)/mailto/#."""
    text = _MD_BAD_LINK.sub("](#blocked:", text)
    if _MD_RAW_HTML.search(text):
        text = sanitize_html(text)
    return text


def svg_as_image(svg: str) -> str:
    """An ``<img>`` showing ``svg``: an image runs no script and loads nothing."""
    data = base64.b64encode(svg.encode("utf-8", "replace")).decode()
    return f'<img src="data:image/svg+xml;base64,{data}" alt="SVG output from the microVM">'


def _note(blocked: Iterable[str]) -> str:
    names = ", ".join(sorted(blocked))
    return (f"[smolvm] blocked {names} output from the microVM: it could run code in your browser. "
            f"To allow it, set SandboxConfig.output_allow_mimes (or output_policy='trusted' if you trust "
            f"this code).")


class OutputPolicy:
    """Filters guest outputs for a frontend; ``mode`` is ``safe`` or ``trusted``."""

    def __init__(self, mode: str = "safe", allow_mimes: Iterable[str] = (),
                 widget_modules: Iterable[str] = DEFAULT_WIDGET_MODULES) -> None:
        if mode not in ("safe", "trusted"):
            raise ValueError(f"output policy {mode!r}: use 'safe' or 'trusted'")
        self.mode = mode
        self.allowed = SAFE_MIMES | frozenset(allow_mimes)
        self.widget_modules = frozenset(widget_modules)
        #: comm_id -> model name of the guest's widgets (to sanitise HTML values).
        self.models: dict[str, str] = {}
        #: Notes for the user about what was blocked, for the caller to show and clear.
        self.notes: list[str] = []

    @classmethod
    def from_config(cls, config) -> OutputPolicy:
        """The policy a :class:`~smolvm_kernel.config.SandboxConfig` sets."""
        return cls(config.output_policy, config.output_allow_mimes, config.widget_modules)

    @property
    def trusted(self) -> bool:
        return self.mode == "trusted"

    # -- display bundles

    def bundle(self, data, metadata=None) -> tuple[dict, dict]:
        """The bundle a frontend may render, and its metadata. What was blocked
        is added to :attr:`notes` (the relay shows them in the cell)."""
        if not isinstance(data, dict):
            return {"text/plain": "[smolvm] a malformed output from the microVM was dropped"}, {}
        metadata = metadata if isinstance(metadata, dict) else {}
        if self.trusted:
            return data, metadata
        out: dict = {}
        blocked = set()
        for mime, value in data.items():
            if not isinstance(mime, str):
                continue
            if mime not in self.allowed:
                blocked.add(mime)
                continue
            if mime in _TEXT_MIMES:
                # A frontend renders a list of strings joined: check what it would render.
                value = _text(value)
                if value is None:
                    blocked.add(mime)
                    continue
            if mime == "text/html":
                value = sanitize_html(value)
            elif mime == "text/markdown":
                value = sanitize_markdown(value)
            elif mime == "text/latex" and (_LATEX_LINK.search(value) or _LATEX_HTML.search(value)):
                blocked.add(mime)
                continue
            elif mime == "image/svg+xml":
                if "text/html" not in data:
                    out["text/html"] = svg_as_image(value)
                continue
            out[mime] = value
        if blocked:
            if set(out) <= {"text/plain"}:
                # The note replaces a repr such as "<IPython.core.display.Javascript object>".
                out["text/plain"] = _note(blocked)
            else:
                self.notes.append(_note(blocked))   # the rest renders; say what did not
        meta = {k: v for k, v in metadata.items() if k in out or not isinstance(k, str) or "/" not in k}
        return out, meta

    # -- whole messages

    def content(self, msg_type: str, content: dict) -> dict | None:
        """The content to relay for one guest message (changed in place), or None to drop it."""
        if self.trusted:
            return content
        if msg_type in ("display_data", "execute_result", "update_display_data"):
            content["data"], content["metadata"] = self.bundle(content.get("data"), content.get("metadata"))
        elif msg_type == "execute_reply":
            payload = content.get("payload")
            if isinstance(payload, list):
                content["payload"] = [p for p in (self._payload(p) for p in payload) if p is not None]
        elif msg_type == "input_request":
            prompt = content.get("prompt")
            content["prompt"] = "[microVM] " + (prompt if isinstance(prompt, str) else "")
        elif msg_type == "comm_open":
            return self._comm_open(content)
        elif msg_type == "comm_msg":
            return self._comm_msg(content)
        return content

    def _payload(self, item):
        if not isinstance(item, dict):
            return None
        source = item.get("source")
        if source == "set_next_input":
            text = item.get("text")
            if not isinstance(text, str) or _HOST_LINE.search(text):
                return None
        elif source == "page":
            data, _ = self.bundle(item.get("data"))
            item["data"] = {k: v for k, v in data.items() if k in ("text/plain", "text/html")}
            if not any(isinstance(v, str) and _HOST_LINE.search(v) for v in item["data"].values()):
                return item
            return None
        elif source not in ("edit_magic", "ask_exit"):
            return None
        return item

    # -- widgets

    def _state_ok(self, state: dict) -> bool:
        return all(state.get(k) in (None, "") or state.get(k) in self.widget_modules for k in _MODULE_KEYS)

    def _clean_state(self, comm_id, state: dict) -> None:
        if "description_allow_html" in state:
            state["description_allow_html"] = False
        if self.models.get(comm_id) in _HTML_VALUE_MODELS and isinstance(state.get("value"), str):
            state["value"] = sanitize_html(state["value"])
        outputs = state.get("outputs")
        if isinstance(outputs, list):
            for out in outputs:
                if isinstance(out, dict) and "data" in out:
                    out["data"], out["metadata"] = self.bundle(out.get("data"), out.get("metadata"))

    def _comm_open(self, content: dict) -> dict | None:
        data = content.get("data")
        state = data.get("state") if isinstance(data, dict) else None
        if content.get("target_name") != "jupyter.widget" or not isinstance(state, dict):
            return content
        if not self._state_ok(state):
            self.notes.append(f"[smolvm] blocked a widget from module {state.get('_model_module')!r} / "
                              f"{state.get('_view_module')!r}: only {', '.join(sorted(self.widget_modules))} "
                              f"are loaded from the microVM (SandboxConfig.widget_modules adds others)")
            return None
        comm_id = content.get("comm_id")
        if isinstance(comm_id, str) and isinstance(state.get("_model_name"), str):
            self.models[comm_id] = state["_model_name"]
        self._clean_state(comm_id, state)
        return content

    def _comm_msg(self, content: dict) -> dict | None:
        data = content.get("data")
        if not isinstance(data, dict):
            return content
        state = data.get("state")
        if isinstance(state, dict):
            if not self._state_ok(state):
                return None
            self._clean_state(content.get("comm_id"), state)
        states = data.get("states")
        if data.get("method") == "update_states" and isinstance(states, dict):
            for comm_id, entry in list(states.items()):
                st = entry.get("state") if isinstance(entry, dict) else None
                if not isinstance(st, dict) or not self._state_ok(st):
                    states.pop(comm_id)
                    continue
                if isinstance(st.get("_model_name"), str):
                    self.models[comm_id] = st["_model_name"]
                self._clean_state(comm_id, st)
        return content


def safe_output(output, policy: OutputPolicy | None = None):
    """An :class:`~smolvm_kernel.sandbox.Output` fit to display: what
    ``Sandbox.execute`` returns is the guest's, untrusted; this applies the
    safe output policy to it (a new Output; streams and errors are text)."""
    from smolvm_kernel.sandbox import Output

    policy = policy or OutputPolicy()
    content = dict(output.content)
    if output.type in ("display_data", "execute_result", "update_display_data"):
        content["data"], content["metadata"] = policy.bundle(content.get("data"), content.get("metadata"))
    return Output(output.type, content)
