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
