"""Jupyter Server's own idle-kernel culling with a SmolVM kernel: the culled
kernel's VM goes with it, and nothing of it is left on the host."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from smolvm_kernel.host.registry import Registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET", body: dict | None = None):
    req = urllib.request.Request(f"{base}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read() or b"null")


def test_an_idle_kernel_culled_by_jupyter_server_takes_its_vm(kernelspec, tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--MappingKernelManager.cull_idle_timeout=8", "--MappingKernelManager.cull_interval=2",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        before = {r.vm_id for r in Registry().list()}
        kernel = _api(base, token, "/api/kernels", "POST", {"name": kernelspec})
        deadline = time.monotonic() + 120
        while not (mine := [r for r in Registry().list() if r.vm_id not in before]):
            assert time.monotonic() < deadline, "the kernel's VM never appeared"
            time.sleep(0.5)
        (vm,) = mine
        assert Path(f"/proc/{vm.vmm_pid}").exists()
        t = time.monotonic()
        deadline = t + 90
        while any(k["id"] == kernel["id"] for k in _api(base, token, "/api/kernels")):
            assert time.monotonic() < deadline, "the idle kernel was not culled"
            time.sleep(1)
        culled_after = time.monotonic() - t
        end = time.monotonic() + 10
        while Path(f"/proc/{vm.vmm_pid}").exists() and time.monotonic() < end:
            time.sleep(0.2)
        print(f"culled {culled_after:.0f} s after its VM was up; VMM gone")
        assert not Path(f"/proc/{vm.vmm_pid}").exists()
        assert not Path(vm.run_dir).exists()
        assert vm.vm_id not in {r.vm_id for r in Registry().list()}
        assert "Culling kernel" in (tmp_path / "server.log").read_text()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
