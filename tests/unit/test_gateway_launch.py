"""SmolVM's gateway launcher against gateway_provisioners' own code: the response
it sends decodes in the provisioner's ResponseManager, and the communication
port answers the provisioner's requests."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import pytest

from smolvm_kernel.remote import launcher as gateway


def _manager(monkeypatch):
    """gateway_provisioners' ResponseManager with its keys, without its socket."""
    from gateway_provisioners.response_manager import ResponseManager

    monkeypatch.setattr(ResponseManager, "_start_response_manager", lambda self: None)
    return ResponseManager()


def test_the_response_decodes_in_the_provisioners_response_manager(monkeypatch):
    rm = _manager(monkeypatch)
    info = {"shell_port": 5001, "iopub_port": 5002, "stdin_port": 5003, "control_port": 5004, "hb_port": 5005,
            "ip": "0.0.0.0", "key": "k-123", "transport": "tcp", "signature_scheme": "hmac-sha256",
            "kernel_id": "abc", "pid": 42, "pgid": 42, "comm_port": 5006}
    decoded = rm._decode_payload(gateway.encrypt_response(info, rm.public_key))
    assert decoded == {**info, "key": b"k-123"}


def test_both_flag_spellings_and_the_checks():
    a = gateway.parse_args(["--kernel-id", "k", "--response-address", "10.0.0.1:8877", "--public-key", "P",
                            "--port-range", "40000..41000"])
    b = gateway.parse_args(["--RemoteProcessProxy.kernel-id", "k", "--RemoteProcessProxy.response-address",
                            "10.0.0.1:8877", "--RemoteProcessProxy.public-key", "P",
                            "--RemoteProcessProxy.spark-context-initialization-mode", "none"])
    assert (a.kernel_id, a.response_address, b.kernel_id, b.public_key) == ("k", "10.0.0.1:8877", "k", "P")
    assert gateway.port_range("40000..41000") == (40000, 41000) and gateway.port_range("0..0") == (0, 0)
    with pytest.raises(SystemExit):
        gateway.port_range("80..90")
    with pytest.raises(SystemExit):
        gateway.parse_args(["--kernel-id", "k", "--response-address", "a:1", "--public-key", "P",
                            "--spark-context-initialization-mode", "eager"])
    with pytest.raises(SystemExit):
        gateway.parse_args(["--kernel-id", "k"])


def test_ports_are_bound_inside_the_range():
    socks = gateway.bind_ports(6, (42000, 43000), ip="127.0.0.1")
    try:
        ports = [s.getsockname()[1] for s in socks]
        assert len(set(ports)) == 6 and all(42000 <= p <= 43000 for p in ports)
    finally:
        for s in socks:
            s.close()


def test_the_communication_port_signals_the_kernel_and_ends_on_shutdown():
    kernel = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                               "signal.signal(signal.SIGINT, lambda *a: print('interrupted', flush=True))\n"
                               "print('up', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert kernel.stdout.readline().strip() == "up"
        assert gateway.handle_request(json.dumps({"signum": 0}).encode(), kernel)       # a poll
        assert gateway.handle_request(json.dumps({"signum": 2}).encode(), kernel)       # interrupt
        assert kernel.stdout.readline().strip() == "interrupted"
        for junk in (b"not json", b"[1]", json.dumps({"signum": 11}).encode(), json.dumps({"signum": True}).encode()):
            assert gateway.handle_request(junk, kernel) and kernel.poll() is None
        assert not gateway.handle_request(json.dumps({"shutdown": 1}).encode(), kernel)
        assert gateway.handle_request(json.dumps({"signum": 15}).encode(), kernel)
        assert kernel.wait(10) != 0
    finally:
        kernel.kill()
        kernel.wait()


def test_the_remote_command_quotes_every_value_a_client_can_choose(tmp_path, monkeypatch):
    """Under a Kernel Gateway the client sets KERNEL_USERNAME (and other KERNEL_*
    values): the command run over SSH must keep each one a single word. The
    built command is run by /bin/sh here, as sshd would; the control runs
    gateway_provisioners' own builder with the same values and shows the
    injection working, so this test can fail."""
    from types import SimpleNamespace

    import gateway_provisioners.distributed as dist

    from smolvm_kernel.remote import placement

    monkeypatch.setattr(dist, "kernel_log_dir", str(tmp_path))
    monkeypatch.setattr(placement, "kernel_log_dir", str(tmp_path))
    marker = tmp_path / "pwned"
    hostile = f'x";touch {marker};"'
    env = {"KERNEL_ID": "0b4c2c1e-1111-4222-8333-444455556666", "KERNEL_USERNAME": hostile,
           "GP_IMPERSONATION_ENABLED": "False"}
    argv = ["/bin/echo", f"$(touch {marker}-argv)", "{port_range}"]

    def raise_(exc, chained=None):
        raise exc

    def fake(spec_env):
        # The builder's inputs only (a provisioner proper needs a kernel manager).
        return SimpleNamespace(ip="192.0.2.10", kernel_spec=SimpleNamespace(env=spec_env), kernel_log=None,
                               ip_is_local=dist.DistributedProvisioner.ip_is_local, log_and_raise=raise_)

    def built(cls):
        # 192.0.2.10 (documentation range) is never contacted: only the command is built.
        return cls._build_startup_command(fake({"SMOLVM_PROFILE": "base"}), list(argv), env=dict(env))

    def run(command: str) -> None:
        subprocess.run(["/bin/sh", "-c", command], cwd=tmp_path, timeout=10, capture_output=True)
        time.sleep(0.2)                    # the nohup'd echo is in the background

    run(built(dist.DistributedProvisioner))
    assert marker.exists(), "control: gateway_provisioners' own command should run the injected touch"
    marker.unlink()
    (tmp_path / "pwned-argv").unlink(missing_ok=True)

    command = built(placement.SmolVMProvisioner)
    run(command)
    assert not marker.exists() and not (tmp_path / "pwned-argv").exists()
    log = (tmp_path / f"kernel-{env['KERNEL_ID']}.log").read_text()
    assert f"$(touch {marker}-argv) {{port_range}}" in log       # the argv arrived as written
    assert f"export KERNEL_USERNAME={shlex.quote(hostile)};" in command

    env["KERNEL_ID"] = "../../etc/x"
    with pytest.raises(ValueError, match="is not a kernel id"):
        placement.SmolVMProvisioner._build_startup_command(fake({}), list(argv), env=dict(env))
