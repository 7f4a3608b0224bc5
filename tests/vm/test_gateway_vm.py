"""SmolVM kernels started by a Jupyter Server through gateway_provisioners'
DistributedProvisioner, on real VMs: the launch protocol (the encrypted
response, the communication port) with the SmolVM launcher, and a cell, an
interrupt, a restart (a fresh VM) and a shutdown (nothing left) through the
server's REST and websocket APIs.

The host is this machine, on loopback: the provisioner then starts the
launcher without SSH. Two hosts reached over SSH: test_gateway_hosts.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("gateway_provisioners", reason="pip install gateway_provisioners (the test extra has it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launchers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "smolvm_kernel/gateway.py"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def gateway(image, tmp_path_factory):
    from smolvm_kernel.jupyter import kernelspec
    from hubclient import ServerUser

    root = tmp_path_factory.mktemp("gateway")
    kernelspec.install("smolvm-gateway", prefix=str(root), gateway_hosts=["127.0.0.1"])
    env = {**os.environ, "JUPYTER_PATH": str(root / "share" / "jupyter"),
           # The provisioner's response socket on loopback (not the host's first public address).
           "GP_RESPONSE_IP": "127.0.0.1", "GP_RESPONSE_PORT": str(_free_port()),
           "GP_KERNEL_LOG_DIR": str(root),
           # The provisioner refuses kernels for root; the user the kernel is for.
           "KERNEL_USERNAME": "smolvm-test", "JUPYTER_RUNTIME_DIR": str(root / "runtime")}
    user, server = ServerUser.start(root, env)
    yield user, root
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()




def test_a_kernel_through_the_distributed_provisioner_runs_interrupts_restarts_and_shuts_down(gateway):
    from smolvm_kernel.host.registry import Registry

    user, root = gateway
    before = {r.vm_id for r in Registry().list()}
    kid = user.start_kernel("smolvm-gateway")
    (launcher,) = _launchers()
    r = user.run_cell(kid, "import platform\nx = 1\nplatform.release()")
    assert r.status == "ok" and "cloud-amd64" in r.text, r.text
    (vm,) = [v for v in Registry().list() if v.vm_id not in before]

    r = user.interrupt_cell(kid)
    assert r.status == "error" and any(o["content"].get("ename") == "KeyboardInterrupt" for o in r.outputs), r.outputs
    assert user.run_cell(kid, "x").text == "1"                                # the VM lived through it

    user.server("POST", f"/api/kernels/{kid}/restart")
    assert user.run_cell(kid, "'x' in globals()").text == "False"             # a fresh VM, and no note:
    # a restart asked for is no lost host
    assert not Path(f"/proc/{vm.vmm_pid}").exists()
    (vm2,) = [v for v in Registry().list() if v.vm_id not in before]

    user.server("DELETE", f"/api/kernels/{kid}")
    deadline = time.monotonic() + 30
    while (_launchers() or Path(f"/proc/{vm2.vmm_pid}").exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _launchers() and not Path(f"/proc/{vm2.vmm_pid}").exists()
    assert not Path(vm2.run_dir).exists() and vm2.vm_id not in {v.vm_id for v in Registry().list()}
    assert not list(Path("/tmp").glob(f"smolvm-gateway-*/kernel-{kid}.json"))   # the connection file too


def test_a_jupyter_server_with_gateway_url_runs_a_smolvm_kernel_through_the_gateway(gateway, tmp_path):
    """The client side as users run it: a Jupyter Server (what JupyterLab and
    Notebook serve from) configured with the gateway's URL (--gateway-url), whose
    GatewayClient asks the gateway for the kernel; the cell runs in a VM the
    gateway placed."""
    from hubclient import ServerUser

    gw, _ = gateway
    # The client server's own configuration: the gateway's URL and token, and the
    # user name it passes on (the gateway refuses kernels for root).
    (tmp_path / "jupyter_server_config.py").write_text(
        f"c.GatewayClient.url = {gw.base!r}\nc.GatewayClient.auth_token = {gw.token!r}\n"
        "c.GatewayClient.allowed_envs = 'KERNEL_USERNAME'\n")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path),
           "KERNEL_USERNAME": "smolvm-client"}
    client, proc = ServerUser.start(tmp_path, env)
    try:
        assert "smolvm-gateway" in client.server("GET", "/api/kernelspecs")["kernelspecs"]
        kid = client.start_kernel("smolvm-gateway")
        r = client.run_cell(kid, "import platform\nplatform.release()")
        assert r.status == "ok" and "cloud-amd64" in r.text, r.text
        assert any(k["id"] == kid for k in gw.server("GET", "/api/kernels"))    # the gateway holds it
        client.server("DELETE", f"/api/kernels/{kid}")
        assert not any(k["id"] == kid for k in gw.server("GET", "/api/kernels"))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
