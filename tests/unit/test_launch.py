"""The kernelspec's launcher (smolvm_kernel/launch.py): early listening sockets
and a sys.path without the notebook's folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.connect import write_connection_file

from smolvm_kernel import launch

LAUNCHER = Path(launch.__file__)


def test_connection_file_reads_like_json(tmp_path):
    path = tmp_path / "k.json"
    write_connection_file(str(path), key=b"secret")
    assert launch.read_connection_file(str(path)) == json.loads(path.read_text())
    for bad in ("", "[1, 2]", '{"a": 1} {"b": 2}', "not json", '{"a": }'):
        path.write_text(bad)
        with pytest.raises(ValueError):
            launch.read_connection_file(str(path))


def test_listen_opens_every_port_and_skips_what_it_cannot_bind(tmp_path):
    path = tmp_path / "k.json"
    write_connection_file(str(path), key=b"secret")
    info = launch.read_connection_file(str(path))
    taken = socket.socket()
    taken.bind(("127.0.0.1", info["stdin_port"]))
    taken.listen()
    try:
        fds = launch.listen(info)
    finally:
        taken.close()
    try:
        assert set(fds) == {"shell", "control", "iopub", "hb"}
        for name, fd in fds.items():
            sock = socket.socket(fileno=os.dup(fd))
            assert sock.getsockname() == ("127.0.0.1", info[f"{name}_port"])
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            sock.close()
    finally:
        for fd in fds.values():
            os.close(fd)
    assert launch.listen({**info, "transport": "ipc"}) == {}
    assert launch.listen({**info, "ip": "192.0.2.1"}) == {}   # not this host's (TEST-NET-1)


def test_the_launchers_folder_is_dropped_from_sys_path_through_links(tmp_path):
    """Python resolves links in the script's folder before putting it on
    sys.path; kernel.json may name the launcher through a link."""
    real = tmp_path / "real" / "pkg"
    real.mkdir(parents=True)
    (real / "launch.py").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    path = [str(real), "/usr/lib/python3.11", ""]
    assert launch.without_folder(path, str(tmp_path / "link" / "pkg")) == ["/usr/lib/python3.11", ""]


def test_the_package_folder_is_not_on_the_kernels_path(tmp_path):
    """End to end, with the launcher named through a link: a sitecustomize
    (run by site.main(), after the launcher's fix) tries to import the
    package's errors.py as a top-level module."""
    (tmp_path / "link").symlink_to(LAUNCHER.parent.parent)
    hook = tmp_path / "hook"
    hook.mkdir()
    marker = tmp_path / "seen"
    (hook / "sitecustomize.py").write_text(
        "try:\n    import errors\n    result = 'shadowed'\n"
        "except ImportError:\n    result = 'clean'\n"
        f"open({str(marker)!r}, 'w').write(result)\n")
    env = {**os.environ, "PYTHONPATH": str(hook)}
    subprocess.run([sys.executable, "-S", str(tmp_path / "link" / LAUNCHER.parent.name / LAUNCHER.name),
                    "-f", "missing.json"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert marker.read_text() == "clean"


def test_connection_file_argument_forms():
    assert launch.connection_file(["-f", "a.json"]) == "a.json"
    assert launch.connection_file(["--connection-file", "b.json"]) == "b.json"
    assert launch.connection_file(["--connection-file=c.json"]) == "c.json"
    assert launch.connection_file(["-f"]) is None


@pytest.mark.parametrize("entry", [["-S", str(LAUNCHER)], ["-m", "smolvm_kernel"]],
                         ids=["kernelspec launcher", "python -m"])
def test_nothing_is_imported_from_the_notebook_folder(tmp_path, entry):
    """A notebook folder is anybody's: a zmq.py in it must not run on the host."""
    marker = tmp_path / "ran"
    (tmp_path / "zmq.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The control: plain Python in that folder does import it.
    subprocess.run([sys.executable, "-c", "import zmq"], cwd=tmp_path, env=env, check=True)
    assert marker.exists()
    marker.unlink()
    proc = subprocess.run([sys.executable, *entry, "-f", "missing.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "missing.json" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("env, says", [({"SMOLVM_MEM_MIB": "1"}, "mem_mib=1 is out of range"),
                                       ({"SMOLVM_VCPUS": "two"}, "SMOLVM_VCPUS='two' is not a whole number")],
                         ids=["out of range", "not a number"])
def test_a_wrong_setting_is_named_in_the_notebook_and_the_kernel_stays_up(tmp_path, monkeypatch, env, says):
    """The kernel process started from its kernelspec, no VM: every cell says what to fix."""
    from jupyter_client.manager import start_new_kernel

    from smolvm_kernel.jupyter import kernelspec

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    kernelspec.install("smolvm-test", prefix=str(tmp_path))
    env = {**os.environ, **env}
    km, kc = start_new_kernel(kernel_name="smolvm-test", startup_timeout=60, env=env, cwd=str(tmp_path))
    try:
        for _ in range(2):
            msgs = []
            reply = kc.execute_interactive("6*7", timeout=60, output_hook=msgs.append)
            assert reply["content"]["status"] == "error"
            assert says in reply["content"]["evalue"] and "restart the kernel" in reply["content"]["evalue"]
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
