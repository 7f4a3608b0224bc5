"""The QEMU command line: no NIC, read-only base, serial channel, hardening."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolvm_kernel.backends.base import VMSpec
from smolvm_kernel.backends.qemu import qemu_argv
from smolvm_kernel.images import Image


def _spec(tmp_path: Path, **kw) -> VMSpec:
    image = Image("base", "0" * 64, tmp_path / "img", "6.1.0-test")
    return VMSpec(vm_id="abc", run_dir=tmp_path / "run", image=image, **kw)


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_machine(tmp_path):
    argv = qemu_argv(_spec(tmp_path, vcpus=3, mem_mib=768, accel="tcg", tsc_khz=2500000), "qemu")
    assert _opt(argv, "-M")[0].startswith("microvm,acpi=on")
    assert _opt(argv, "-accel") == ["tcg,tb-size=64"]
    assert _opt(argv, "-smp") == ["3"] and _opt(argv, "-m") == ["768M"]
    assert "-nodefaults" in argv and "-no-reboot" in argv
    cmdline = _opt(argv, "-append")[0]
    assert "tsc_early_khz=2500000" in cmdline and "tsc=reliable" in cmdline
    assert "panic=-1" in cmdline


def test_kvm_gets_no_tsc_override(tmp_path):
    argv = qemu_argv(_spec(tmp_path, accel="kvm", tsc_khz=2500000), "qemu")
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    assert "tsc_early_khz" not in _opt(argv, "-append")[0]


def test_no_network_device_and_read_only_base(tmp_path):
    argv = qemu_argv(_spec(tmp_path), "qemu")
    joined = " ".join(argv)
    assert "-netdev" not in argv and "-nic" not in argv and "virtio-net" not in joined
    drives = _opt(argv, "-drive")
    base = [d for d in drives if d.startswith("id=base")][0]
    assert "readonly=on" in base
    scratch = [d for d in drives if d.startswith("id=scratch")][0]
    assert str(tmp_path / "run" / "scratch.img") in scratch and "readonly" not in scratch
    devices = _opt(argv, "-device")
    assert "virtio-blk-device,drive=base,serial=smolvm-base" in devices
    assert "virtserialport,chardev=agent,name=org.smolvm.agent.0" in devices
    assert any(d.startswith("virtio-rng-device") for d in devices)


def test_sockets_live_in_the_private_run_dir(tmp_path):
    argv = qemu_argv(_spec(tmp_path), "qemu")
    chardevs = _opt(argv, "-chardev")
    assert any(f"path={tmp_path / 'run' / 'agent.sock'}" in c for c in chardevs)
    assert _opt(argv, "-qmp") == [f"unix:{tmp_path / 'run' / 'qmp.sock'},server=on,wait=off"]


def test_hardening(tmp_path):
    argv = qemu_argv(_spec(tmp_path), "qemu", sandboxed=True, runas="nobody")
    sandbox = _opt(argv, "-sandbox")[0]
    assert "spawn=deny" in sandbox and "obsolete=deny" in sandbox
    assert _opt(argv, "-runas") == ["nobody"]
    unprivileged = qemu_argv(_spec(tmp_path), "qemu", sandboxed=True)
    assert "elevateprivileges=deny" in _opt(unprivileged, "-sandbox")[0]
    assert "-runas" not in unprivileged


def test_debug_console(tmp_path):
    assert "loglevel=7" in _opt(qemu_argv(_spec(tmp_path, debug_console=True), "q"), "-append")[0]
    assert "quiet" in _opt(qemu_argv(_spec(tmp_path), "q"), "-append")[0]


def test_unknown_accel(tmp_path):
    with pytest.raises(ValueError):
        qemu_argv(_spec(tmp_path, accel="xen"), "qemu")
