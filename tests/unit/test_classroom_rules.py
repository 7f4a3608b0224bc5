"""The classroom's guards on the host side: only allowed kernelspecs from folders
students cannot write, and no file from a VM written to a hidden place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jupyter_client.kernelspec import NoSuchKernel

from smolvm_kernel.classroom import ClassroomKernelSpecManager
from smolvm_kernel.transfer import TransferError, confine, confine_writable


def _spec(folder: Path, name: str, argv: list[str]) -> None:
    d = folder / "kernels" / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))


def test_a_kernel_outside_the_allowed_set_cannot_be_started_by_name(tmp_path, monkeypatch):
    shared, home = tmp_path / "shared", tmp_path / "home"
    _spec(shared, "smolvm-python", ["smolvm"])
    _spec(shared, "python3", ["host-python"])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("JUPYTER_PATH", str(shared))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(home / ".local/share/jupyter"))
    # The student's own kernelspec of the same name, which plain Jupyter finds first.
    _spec(home / ".local/share/jupyter", "smolvm-python", ["host-code"])
    ksm = ClassroomKernelSpecManager(allowed_kernelspecs={"smolvm-python"}, ensure_native_kernel=False)
    assert ksm.get_kernel_spec("smolvm-python").argv == ["smolvm"]
    with pytest.raises(NoSuchKernel):
        ksm.get_kernel_spec("python3")
    assert set(ksm.find_kernel_specs()) == {"smolvm-python"}


def test_a_pull_never_writes_into_a_hidden_place(tmp_path):
    for bad in (".local/share/jupyter/kernels/smolvm-python/kernel.json", ".bashrc", "a/.jupyter/x.py"):
        with pytest.raises(TransferError, match="hidden"):
            confine_writable(tmp_path, confine(tmp_path, bad))
    assert confine_writable(tmp_path, confine(tmp_path, "data/out.csv")) == tmp_path / "data/out.csv"
