"""The idle-pause decision and what may be paused (pause.py); the pause itself
runs on real VMs in tests/vm/test_pause.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.jupyter.hostline import format_status
from smolvm_kernel.vm.pause import pause_due, why_not_pausable
from tests.unit.test_policy import needs_root, with_policy  # noqa: F401 (a fixture)


def test_pause_is_due_only_when_idle_long_enough_and_not_busy():
    assert pause_due(now=100.0, last_active=40.0, pause_after=60, busy=False)
    assert not pause_due(now=100.0, last_active=41.0, pause_after=60, busy=False)
    assert not pause_due(now=100.0, last_active=0.0, pause_after=60, busy=True)
    assert not pause_due(now=1e9, last_active=0.0, pause_after=0, busy=False)   # 0 = never


def _machine(backend="qemu", transport="serial"):
    return SimpleNamespace(backend=SimpleNamespace(name=backend), transport=transport)


def test_only_serial_qemu_vms_without_a_network_are_paused():
    assert why_not_pausable(_machine(), "none") is None
    assert "network" in why_not_pausable(_machine(), "nat")
    assert "ssh" in why_not_pausable(_machine(transport="ssh"), "nat")
    assert "QEMU" in why_not_pausable(_machine(backend="firecracker", transport="vsock"), "none")
    assert why_not_pausable(SimpleNamespace(backend=None), "none") is not None
    assert why_not_pausable(None, "none") is not None


def test_pause_after_is_checked_and_named():
    assert SandboxConfig(pause_after=600).validated().pause_after == 600
    with pytest.raises(ConfigError, match="pause_after"):
        SandboxConfig().validated().changed(pause_after=-1)


@needs_root
def test_the_instructors_pause_after_brings_a_users_value_down(with_policy, monkeypatch):
    monkeypatch.delenv("SMOLVM_PAUSE_AFTER", raising=False)
    with_policy("pause_after = 300\n")
    assert SandboxConfig().validated().pause_after == 300             # never -> 300
    assert SandboxConfig(pause_after=3600).validated().pause_after == 300
    assert SandboxConfig(pause_after=60).validated().pause_after == 60   # shorter stays


def test_status_says_paused_or_when_it_would_pause():
    paused = format_status({"state": "paused", "paused_state_bytes": 180 * 2**20, "last_pause_s": 1.4,
                            "pause_after_s": 600})
    assert "paused     to disk" in paused and "180 MiB" in paused
    off = format_status({"state": "ready", "pause_after_s": 600, "pause_note": "a VM with a network is not paused"})
    assert "off: a VM with a network" in off
