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
- ``text/html`` is sanitised with nh3 (the Ammonia sanitiser; markup.py): no
  scripts, event handlers, forms, iframes, styles, ``data-*`` attributes
  (JupyterLab's commandlinker runs commands from those), ``javascript:`` or
  relative links, and images only from ``data:`` URLs (an
  ``<img src=https://...>`` would carry guest data out through the browser);
- ``text/markdown`` is rendered to HTML on the host (mistune) and that HTML is
  sanitised the same way and sent as ``text/html``: no Markdown syntax
  (reference links, entities, escapes, remote images) reaches a frontend's own
  Markdown renderer;
- ``image/svg+xml`` becomes an ``<img>`` of the SVG as a data URL, in which a
  browser runs no script; LaTeX that links anywhere but http(s) is shown as text;
- widget models load only from ``widget_modules`` (the ``@jupyter-widgets``
  core by default), their protocol keys and state are checked, and comm_open
  never names a script to load nor a frontend's own target: widget_policy.py
  says what exactly;
- ``set_next_input`` and pager payloads never put a ``%smolvm`` line (which
  runs on the host) into the user's next cell; pager bundles are filtered;
- ``input_request`` prompts say that the VM is asking.

``trusted`` passes everything through (one user who trusts the code they run).

This module is the dispatcher: which message carries what, each display
bundle's mime types, the payloads; markup.py and widget_policy.py hold the
checks of what a bundle's HTML and a comm's widget may be.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from smolvm_kernel.jupyter.markup import latex_refused, sanitize_html, sanitize_markdown, svg_as_image
from smolvm_kernel.jupyter.widget_policy import DEFAULT_WIDGET_MODULES, WidgetPolicy

#: Rendered by frontends without running anything the bundle carries.
SAFE_MIMES = frozenset({
    "text/plain", "text/html", "text/markdown", "text/latex", "image/png", "image/jpeg", "image/gif",
    "image/webp", "image/bmp", "image/svg+xml", "application/json",
    "application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.stdout",
    "application/vnd.jupyter.stderr",
})
#: Mime types whose value a frontend renders as markup: a string (or a list of strings) only.
_TEXT_MIMES = frozenset({"text/plain", "text/html", "text/markdown", "text/latex", "image/svg+xml"})
_HOST_LINE = re.compile(r"^\s*%+smolvm\b", re.MULTILINE)


def _text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    return None


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
        #: Notes for the user about what was blocked, for the caller to show and clear.
        self.notes: list[str] = []
        #: The guest's widgets and other comms (an Output widget's outputs go through bundle()).
        self.comms = WidgetPolicy(widget_modules, self.bundle, self._refuse)

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
                # Sent as host-rendered, sanitised HTML (unless the bundle has HTML of its own).
                if _text(data.get("text/html")) is None:
                    out["text/html"] = sanitize_markdown(value)
                continue
            elif mime == "text/latex" and latex_refused(value):
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
            return self.comms.comm_open(content)
        elif msg_type == "comm_msg":
            return self.comms.comm_msg(content)
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

    def _refuse(self, what: str) -> None:
        self.notes.append(f"[smolvm] blocked {what} from the microVM: it could run code in your browser or "
                          f"send data out through it (output_policy='trusted' allows it if you trust this code)")
        return None


def safe_output(output, policy: OutputPolicy | None = None):
    """An :class:`~smolvm_kernel.vm.sandbox.Output` fit to display: what
    ``Sandbox.execute`` returns is the guest's, untrusted; this applies the
    safe output policy to it (a new Output; streams and errors are text)."""
    from smolvm_kernel.vm.sandbox import Output

    policy = policy or OutputPolicy()
    content = dict(output.content)
    if output.type in ("display_data", "execute_result", "update_display_data"):
        content["data"], content["metadata"] = policy.bundle(content.get("data"), content.get("metadata"))
    return Output(output.type, content)
