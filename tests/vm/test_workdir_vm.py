"""The notebook's folder as the VM's working folder, in real VMs (vm/workdir.py, guest/workdir.py)."""

from __future__ import annotations

import json
import os
import time

import pytest
from jupyter_client.manager import start_new_kernel

from smolvm_kernel.vm.sandbox import Sandbox
from tests.support import wait_for


def run(kc, code, timeout=120):
    outs = []
    reply = kc.execute_interactive(code, output_hook=lambda m: outs.append(m), timeout=timeout)
    return reply["content"], outs


def text(outs, name="stdout"):
    return "".join(m["content"]["text"] for m in outs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


@pytest.fixture
def course(tmp_path):
    """A course folder as an instructor hands it out: a notebook, its data, a helper module."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "heights.csv").write_text("name,height\nWashington,189\nAdams,170\n")
    (tmp_path / "data" / "table.csv").write_text("x,y\n" + "1,2\n" * 20000)     # travels compressed
    (tmp_path / "helpers_05.py").write_text("def mean(xs):\n    return sum(xs) / len(xs)\n")
    (tmp_path / "lesson.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4,
                                                       "nbformat_minor": 5}))
    (tmp_path / ".hidden-token").write_text("not for the VM")
    with open(tmp_path / "huge.bin", "wb") as fh:     # sparse: over the 64 MiB a file, on no disk
        fh.truncate(65 * 1024 * 1024)
    return tmp_path


def test_a_notebook_works_with_its_folder_and_what_it_writes_outlives_a_restart(kernelspec, course):
    km, kc = start_new_kernel(kernel_name=kernelspec, startup_timeout=60, cwd=str(course))
    try:
        reply, outs = run(kc, "import csv, os, helpers_05\n"
                              "rows = list(csv.DictReader(open('data/heights.csv')))\n"
                              "print(os.getcwd(), helpers_05.mean([int(r['height']) for r in rows]))\n"
                              "print(sorted(os.listdir('.')))\n"
                              "print(open('data/table.csv').read() == 'x,y\\n' + '1,2\\n' * 20000)")
        assert reply["status"] == "ok", reply
        out = text(outs)
        assert "/home/user 179.5" in out
        assert "'lesson.ipynb'" in out and "'huge.bin'" not in out and ".hidden-token" not in out
        assert out.strip().endswith("True")
        note = text(outs, "stderr")
        assert "huge.bin" in note and "left out" in note       # the first cell says what a limit left out

        reply, outs = run(kc, "open('out.csv', 'w').write('name,height\\nAdams,170\\n')\n"
                              "os.makedirs('results', exist_ok=True); open('results/r.txt', 'w').write('r')\n"
                              "open('numpy.py', 'w').write('raise SystemExit')\n"
                              "open('.bashrc', 'a').write('echo pwned')\n"
                              "os.makedirs('x', exist_ok=True); open('x/__init__.py', 'w').write('')\n"
                              "open('x/data.txt', 'w').write('d')\n"
                              "open('lesson.ipynb', 'w').write('{\"overwritten\": true}')")
        assert reply["status"] == "ok", reply
        said = text(outs, "stderr")
        for name in ("numpy.py", "x/__init__.py", "x/data.txt", "lesson.ipynb", "%smolvm pull"):
            assert name in said, (name, said)
        assert ".bashrc" not in said     # hidden: not even looked at
        assert wait_for(lambda: (course / "out.csv").exists() and (course / "results" / "r.txt").exists(),
                        timeout=15)
        assert (course / "out.csv").read_text() == "name,height\nAdams,170\n"
        assert not (course / "numpy.py").exists() and not (course / "x").exists()
        assert not (course / ".bashrc").exists()
        assert json.loads((course / "lesson.ipynb").read_text())["nbformat"] == 4

        # written after the cell's end, just before a restart: copied back by
        # the stop (no cell end reports it), read by the next VM
        run(kc, "import threading; threading.Timer(0.5, lambda: open('late.txt', 'w').write('late')).start()")
        time.sleep(2)
        assert not (course / "late.txt").exists()
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=60)
        reply, outs = run(kc, "print(open('out.csv').read().splitlines()[-1], open('late.txt').read())")
        assert reply["status"] == "ok", reply
        assert text(outs).strip() == "Adams,170 late"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert (course / "late.txt").read_text() == "late"
    assert not list(course.rglob("*.part"))


@pytest.mark.parametrize("mode", ["read-only", "off"])
def test_read_only_and_off(image, course, mode):
    sb = Sandbox(workdir=str(course), workdir_mode=mode)
    try:
        sb.start()
        outs = list(sb.execute("import os\nprint(os.path.exists('data/heights.csv'))\n"
                               "open('out.csv', 'w').write('x')"))
        printed = "".join(o.content.get("text", "") for o in outs if o.type == "stream")
        assert printed.strip() == ("True" if mode == "read-only" else "False")
    finally:
        sb.stop()
    assert not (course / "out.csv").exists()


def test_the_policy_caps_the_folder(image, course, tmp_path_factory, monkeypatch):
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    policy.write_text('workdir = "read-only"\n')
    os.chmod(policy.parent, 0o755)
    monkeypatch.setenv("SMOLVM_POLICY_FILE", str(policy))
    sb = Sandbox(workdir=str(course))
    assert sb.config.workdir_mode == "read-only"       # not chosen: brought within the cap
    from smolvm_kernel.errors import ConfigError
    with pytest.raises(ConfigError, match="at most 'read-only'"):
        Sandbox(workdir=str(course), workdir_mode="read-write")
