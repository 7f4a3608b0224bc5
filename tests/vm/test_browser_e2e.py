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
    from smolvm_kernel import kernelspec
    from smolvm_kernel.images import ImageCache

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

#: Each attack, if it ran, would write pwned-<tag>.txt into the server's root
#: through the contents API with the user's session, as the confirmed escape did.
HOSTILE_CELLS = [
    '''from IPython.display import display, HTML, Javascript, SVG, Markdown
def js(tag):
    return ("(async()=>{const x=(document.cookie.match(/_xsrf=([^;]+)/)||[])[1]||'';"
            "await fetch('/api/contents/pwned-%s.txt',{method:'PUT',headers:{'X-XSRFToken':x,"
            "'Content-Type':'application/json'},body:JSON.stringify({type:'file',format:'text',"
            "content:'pwned'})});(window.__pwned=window.__pwned||[]).push('%s')})()" % (tag, tag))''',
    "display(Javascript(js('js')))",
    "display(HTML('<script>' + js('script') + '</script><b>after the script</b>'))",
    "display(HTML('<img src=\"x\" onerror=\"' + js('onerror') + '\">'))",
    "display(HTML('<a href=\"javascript:' + js('href') + '\">click me (href)</a>'))",
    "display(HTML('<button data-commandlinker-command=\"docmanager:new-untitled\" "
    "data-commandlinker-args=\\'{\"path\": \"\", \"type\": \"file\", \"ext\": \".txt\"}\\'>"
    "new file (commandlinker)</button>'))",
    "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"40\" height=\"10\" onload=\"' + js('svg') + "
    "'\"><rect width=\"40\" height=\"10\" fill=\"teal\"/></svg>'))",
    "display(Markdown('[click me (md)](<javascript:' + js('md') + '>)'))",
    '''import ipywidgets as w
from traitlets import Unicode
class Evil(w.DOMWidget):
    _model_module = Unicode("evil-widget-module").tag(sync=True)
    _view_module = Unicode("evil-widget-module").tag(sync=True)
    _model_name = Unicode("EvilModel").tag(sync=True)
    _view_name = Unicode("EvilView").tag(sync=True)
display(Evil())''',
    "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})",
    "print('all attacks sent')",
]


def _hostile_notebook(path: Path, kernel: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in HOSTILE_CELLS]
    nbformat.write(nb, str(path))


def _run_hostile(page, base: str, token: str, root: Path, name: str) -> None:
    from playwright.sync_api import expect

    # A workspace of its own: only this notebook is open, so "Run All" is its.
    workspace = name.replace(".", "-")
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{name}?token={token}")
    active = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    page.wait_for_selector(f"{active} .jp-Notebook .jp-Cell", timeout=120_000)
    page.wait_for_function(
        f"() => [...document.querySelectorAll('{active} .jp-Toolbar-kernelName')]"
        ".some(e => e.textContent.includes('SmolVM'))", timeout=120_000)
    page.locator(f"{active} .jp-Cell").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    outputs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output")
    expect(outputs.filter(has_text="all attacks sent")).to_have_count(1, timeout=300_000)
    for text in ("click me (href)", "new file (commandlinker)", "click me (md)"):
        target = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output").get_by_text(text)
        if target.count():
            target.first.click()
    time.sleep(5)     # anything that runs has had the time to write its file


@pytest.mark.timeout(900)
def test_hostile_outputs_do_not_run_in_the_browser(lab, page):
    """Every way a cell in the VM could run code in the user's browser (and so
    reach the Jupyter server as the user) is tried: none runs under the default
    policy. The same notebook under output_policy='trusted' is the control:
    there the attacks do write files, so this check can fail."""
    from playwright.sync_api import expect

    from smolvm_kernel import kernelspec

    base, token, root = lab
    kernelspec.install("smolvm-trusted", prefix=os.environ["SMOLVM_TEST_PREFIX"], profile="scipy",
                       backend="qemu", output_policy="trusted")
    _hostile_notebook(root / "hostile.ipynb", "smolvm-scipy")
    _hostile_notebook(root / "hostile-trusted.ipynb", "smolvm-trusted")
    try:
        _run_hostile(page, base, token, root, "hostile.ipynb")
        shot(page, root, "6-hostile-safe")
        written = sorted(p.name for p in root.iterdir() if p.name.startswith(("pwned-", "untitled")))
        assert written == [], f"guest output ran in the browser: {written}"
        assert page.evaluate("() => window.__pwned === undefined")
        outputs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output")
        expect(outputs.filter(has_text="blocked application/javascript")).to_have_count(1)
        expect(outputs.filter(has_text="evil-widget-module")).to_have_count(1)
        expect(outputs.filter(has_text="after the script")).to_have_count(1)       # safe HTML still shows
        expect(outputs.locator("table td").filter(has_text="y")).to_have_count(1)  # and a DataFrame
        expect(outputs.locator("img[src^='data:image/svg+xml']")).to_have_count(1)  # the SVG, as an image

        _run_hostile(page, base, token, root, "hostile-trusted.ipynb")
        shot(page, root, "7-hostile-trusted-control")
        written = {p.name for p in root.iterdir() if p.name.startswith(("pwned-", "untitled"))}
        # JupyterLab runs these when the policy lets them through (the escape
        # this test guards against); the href, SVG and Markdown vectors are
        # refused by JupyterLab itself there, and by the policy here.
        assert {"pwned-js.txt", "pwned-script.txt", "pwned-onerror.txt", "untitled.txt"} <= written, \
            f"the control did not show the attacks working: {sorted(written)}"
    except BaseException:
        shot(page, root, "failure-hostile")
        print(f"screenshots and jupyterlab.log in {root}")
        raise
