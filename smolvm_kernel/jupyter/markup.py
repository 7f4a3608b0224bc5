"""HTML a frontend may render from the guest: sanitised, never run.

The output policy's (output_policy.py) pieces of markup: ``text/html`` through
nh3 (the Ammonia sanitiser: no scripts, event handlers, forms, iframes,
styles, ``data-*`` attributes, ``javascript:`` or relative links, images only
from ``data:`` URLs), ``text/markdown`` rendered to HTML on the host
(mistune) and sanitised the same way, ``image/svg+xml`` as an ``<img>`` of a
data URL, and LaTeX that would link anywhere but http(s) or make HTML.
"""

from __future__ import annotations

import base64
import re

_URL_SCHEMES = {"http", "https", "mailto", "data"}   # data: only for images, see _keep_attribute
_LATEX_LINK = re.compile(r"\\(?:href|url)\s*\{\s*(?!https?:)", re.IGNORECASE)
_LATEX_HTML = re.compile(r"\\(?:class|cssId|style|html|unicode|require)\b")


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


_markdown = None


def markdown_to_html(text: str) -> str:
    """``text`` (Markdown, with its raw HTML and ``$math$``) rendered to HTML, not yet sanitised."""
    global _markdown
    if _markdown is None:
        import mistune

        # escape=False: raw HTML is kept for sanitize_html to judge, as a frontend would render it.
        _markdown = mistune.create_markdown(escape=False, plugins=["strikethrough", "table", "url", "math"])
    return _markdown(text)


def sanitize_markdown(text: str) -> str:
    """Markdown as sanitised HTML: rendered on the host, so a frontend's Markdown
    renderer never sees the guest's syntax (reference links, entities, escapes),
    then cleaned by :func:`sanitize_html` (no remote images, links only to
    http(s)/mailto). Math stays ``\\(...\\)`` or ``$$...$$`` text, which frontends
    typeset in HTML output."""
    try:
        html = markdown_to_html(text)
    except (RecursionError, ValueError):      # a pathological document: shown as text
        import html as _html

        return f"<pre>{_html.escape(text)}</pre>"
    return sanitize_html(html)


def svg_as_image(svg: str) -> str:
    """An ``<img>`` showing ``svg``: an image runs no script and loads nothing."""
    data = base64.b64encode(svg.encode("utf-8", "replace")).decode()
    return f'<img src="data:image/svg+xml;base64,{data}" alt="SVG output from the microVM">'


def latex_refused(text: str) -> bool:
    """Whether LaTeX would link anywhere but http(s), or make HTML (``\\class``, ``\\html``, ...)."""
    return bool(_LATEX_LINK.search(text) or _LATEX_HTML.search(text))
