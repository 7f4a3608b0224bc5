"""The accelerator choice says why in words; the probe's raw evidence is kept apart."""

from __future__ import annotations

import pytest

from smolvm_kernel.backends import accel
from smolvm_kernel.errors import ConfigError

RAW = "qemu-system-x86_64: ../accel/kvm/kvm-all.c:1759: kvm_buf_set_msrs: Assertion `ret == n' failed."


@pytest.fixture
def kvm_that_fails(monkeypatch):
    monkeypatch.setattr(accel, "_kvm_usable", lambda: (True, ""))
    monkeypatch.setattr(accel, "_cached_probe", lambda qemu, image: (
        False, "KVM is present but cannot run this guest (QEMU stopped with an error; nested virtualisation?)",
        f"QEMU under KVM: {RAW}"))


def test_fallback_reason_is_plain_words(kvm_that_fails):
    choice = accel.choose_accel("auto", "qemu", image=None)
    assert choice.name == "tcg"
    assert "cannot run this guest" in choice.reason and "software emulation" in choice.reason
    assert "Assertion" not in choice.reason and "kvm_buf_set_msrs" in choice.detail


def test_asking_for_kvm_names_the_evidence(kvm_that_fails):
    with pytest.raises(ConfigError, match="kvm_buf_set_msrs"):
        accel.choose_accel("kvm", "qemu", image=None)


def test_tcg_on_request():
    assert accel.choose_accel("tcg", "qemu", image=None).name == "tcg"


def test_probes_at_once_in_one_process_do_not_trip_over_each_other(tmp_path, monkeypatch):
    """VMs started at once by threads of one process probe at once: each writes
    the cache through a temporary file of its own (one named by the pid alone
    was shared, and a rename found it gone: seen when the network tests'
    VMs started together)."""
    import sys
    import threading
    from types import SimpleNamespace

    from smolvm_kernel.backends import accel

    monkeypatch.setenv("SMOLVM_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(accel, "probe_kvm", lambda qemu, image: (False, "test", ""))
    image = SimpleNamespace(kernel_release="6.1-test")
    errors = []

    def probe():
        try:
            accel._cached_probe(sys.executable, image)
        except Exception as exc:        # noqa: BLE001 - what the race raised
            errors.append(exc)

    for _ in range(20):
        for cache in tmp_path.rglob("accel-probe.json"):
            cache.unlink()
        threads = [threading.Thread(target=probe) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert not list(tmp_path.rglob("*.tmp"))
