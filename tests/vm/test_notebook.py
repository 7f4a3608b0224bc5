"""The demo notebook, executed by nbclient under the smolvm-scipy kernelspec."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smolvm_kernel.images import ImageCache
from smolvm_kernel.jupyter import kernelspec

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "demo.ipynb"


@pytest.fixture(scope="module")
def executed(image, tmp_path_factory):
    from smolvm_kernel.jupyter.demo import run_notebook

    ImageCache().ensure("scipy")
    kernelspec.install("smolvm-scipy", prefix=os.environ["SMOLVM_TEST_PREFIX"], profile="scipy",
                       backend="qemu")
    out = tmp_path_factory.mktemp("nb") / "demo.executed.ipynb"
    nb = run_notebook(NOTEBOOK, out, "smolvm-scipy")
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(cell) -> str:
    parts = []
    for o in cell.outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif "data" in o:
            parts.append(o.data.get("text/plain", ""))
    return "".join(parts)


def _mimes(cell) -> set[str]:
    return {m for o in cell.outputs for m in o.get("data", {})}


def test_no_cell_failed(executed):
    errors = [o for c in executed for o in c.outputs if o.output_type == "error"]
    assert errors == []


def test_guest_kernel_and_unprivileged_user(executed):
    text = _text(executed[0])
    assert "guest kernel: 6." in text and "cloud-amd64" in text
    assert "as uid 1000" in text


def test_plot_is_a_png(executed):
    assert "image/png" in _mimes(executed[1])


def test_rich_output(executed):
    mimes = _mimes(executed[2])
    assert {"text/html", "text/latex"} <= mimes
    assert "square" in _text(executed[2])


def test_widget_is_rendered_from_the_guest(executed):
    assert "application/vnd.jupyter.widget-view+json" in _mimes(executed[3])
    assert "slider value inside the VM: 3 -> doubled: 6" in _text(executed[4])


def test_isolation_tour(executed):
    net = _text(executed[5])
    assert "network interfaces: ['lo']" in net and "no network:" in net
    assert "host home visible: False" in _text(executed[6])


def test_host_status_line(executed):
    assert "state      ready" in _text(executed[7])


def test_control_panel_cell_shows_a_host_widget(executed):
    assert "application/vnd.jupyter.widget-view+json" in _mimes(executed[8])
    assert not any(o.output_type == "error" for o in executed[8].outputs)


def test_saved_outputs_are_the_cells_own(executed):
    # The boot progress line is transient: cleared before the first cell's outputs.
    saved = [str(o) for c in executed for o in c.outputs]
    assert not [o for o in saved if "microVM ready" in o or "starting microVM" in o
                or "restoring microVM" in o]
