"""The classroom's guards on the host side: only allowed kernelspecs from folders
students cannot write, and no file from a VM written to a hidden place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jupyter_client.kernelspec import NoSuchKernel

from smolvm_kernel.classroom.deploy import ClassroomKernelSpecManager
from smolvm_kernel.jupyter.transfer import TransferError, confine, confine_writable


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


def test_a_kernel_starts_only_in_the_home_and_never_in_a_hidden_folder(tmp_path):
    from smolvm_kernel.classroom.deploy import kernel_path_refusal

    home = tmp_path / "home"
    (home / "lab").mkdir(parents=True)
    (home / ".local/share").mkdir(parents=True)
    (home / "out").symlink_to(tmp_path)
    (home / "hid").symlink_to(home / ".local")
    for ok in ("", "/", "lab", "lab/", "./lab", "missing/folder", "/etc"):   # "/etc" is <home>/etc
        assert kernel_path_refusal(str(home), ok) is None, ok
    for bad in ("..", "../../", "lab/../..", ".local/share/jupyter", ".jupyter", "lab/.x", "out", "hid/share"):
        assert kernel_path_refusal(str(home), bad), bad


def test_a_student_process_is_placed_only_in_its_own_group_or_a_vmm_group():
    from smolvm_kernel.classroom.confine import placed

    v1 = "9:pids:/smolvm-students/{n}\n4:memory:/x/smolvm-students/{n}\n1:cpu,cpuacct:{cpu}\n0::/\n"
    assert placed(v1.format(n="s1", cpu="/smolvm-students/s1"), "s1", 1) == {"memory": True, "cpu": True,
                                                                            "pids": True}
    assert placed(v1.format(n="s1", cpu="/"), "s1", 1)["cpu"] is False
    assert not any(placed(v1.format(n="s2", cpu="/smolvm-students/s2"), "s1", 1).values())
    vmm = "9:pids:/smolvm/hostd-3-77\n4:memory:/x/smolvm/hostd-3-77\n1:cpu:/smolvm/hostd-3-77\n"
    assert all(placed(vmm, "s1", 1).values())
    assert placed("0::/user.slice\n", "s1", 2) == {"": False}
    assert placed("0::/smolvm-students/s1\n", "s1", 2) == {"": True}


def test_the_students_servers_are_written_without_the_routes_to_the_host():
    from smolvm_kernel.classroom.deploy import HUB_CONFIG, STUDENT_SERVER_CONFIG

    for line in ("c.TemplateExporter.extra_template_basedirs = []", 'c.LabApp.extension_manager = "readonly"',
                 'c.ServerApp.root_dir = os.path.expanduser("~")', "c.ServerApp.terminals_enabled = False"):
        assert line in STUDENT_SERVER_CONFIG
    for needle in ('"smolvm_kernel.classroom.deploy.ClassroomSpawner"', '"JUPYTER_DATA_DIR"', '"classroom", "confine"',
                   'c.ClassroomSpawner.workdir = "{dir}/server-cwd"'):
        assert needle in HUB_CONFIG
