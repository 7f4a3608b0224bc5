"""SmolVM's gateway launcher against gateway_provisioners' own code: the response
it sends decodes in the provisioner's ResponseManager, and the communication
port answers the provisioner's requests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from smolvm_kernel import gateway


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
