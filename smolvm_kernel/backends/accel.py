"""Choose the accelerator by probing, not by the presence of /dev/kvm.

Some hosts (nested virtualization such as PVM) expose a /dev/kvm on which an
ordinary guest kernel never boots. ``auto`` therefore boots the real guest
kernel with ``smolvm.probe=1`` under KVM once per host boot and uses KVM only
if the probe line appears on the console in time; otherwise TCG, and it says
why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from smolvm_kernel import paths
from smolvm_kernel.backends.base import VMSpec, die_with_parent
from smolvm_kernel.backends.qemu import qemu_argv
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.images import Image

#: A KVM guest reaches its initramfs in well under a second; TCG needs ~2 s.
#: Past this the kernel is taken to hang (as it does on PVM hosts).
PROBE_TIMEOUT_S = 8.0
PROBE_LINE = b"SMOLVM-PROBE-OK"


@dataclasses.dataclass(frozen=True)
class AccelChoice:
    name: str
    reason: str          # in words a user understands (status line, panel)
    detail: str = ""     # the probe's raw evidence, e.g. QEMU's last stderr line (doctor -v)


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, if the CPU has a constant TSC."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    mhz = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                pass
    if mhz is None or "constant_tsc" not in flags:
        return None
    return int(mhz * 1000)


def _kvm_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no read/write access to /dev/kvm (add this user to the 'kvm' group)"
    return True, ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(qemu: str, image: Image, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str, str]:
    """Boot the guest kernel under KVM until its initramfs prints the probe line.

    Returns whether KVM works, the reason in plain words, and the raw evidence."""
    with tempfile.TemporaryDirectory(prefix="smolvm-probe-") as tmp:
        run = Path(tmp)
        spec = VMSpec(vm_id="probe", run_dir=run, image=image, vcpus=1, mem_mib=256, accel="kvm")
        (run / "scratch.img").touch()
        argv = qemu_argv(spec, qemu, extra_cmdline=("smolvm.probe=1",), sandboxed=False)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        console = spec.console_log.read_bytes() if spec.console_log.exists() else b""
    if PROBE_LINE in console:
        return True, "a test guest booted under KVM", ""
    if stderr:
        return False, ("KVM is present but cannot run this guest (QEMU stopped with an error; "
                       "nested virtualisation?)"), f"QEMU under KVM: {stderr.splitlines()[-1]}"
    return False, ("KVM is present but cannot run this guest (nested virtualisation?)"), \
        f"a test guest did not reach its initramfs under KVM within {timeout:.0f} s"


def choose_accel(requested: str, qemu: str, image: Image) -> AccelChoice:
    """Resolve ``requested`` (auto/kvm/hvf/tcg) to an accelerator that works here."""
    if requested == "tcg":
        return AccelChoice("tcg", "TCG requested in the configuration")
    if requested == "hvf" or (requested == "auto" and sys.platform == "darwin"):
        if sys.platform != "darwin":
            raise ConfigError("accel", "hvf", "HVF exists only on macOS; use auto, kvm or tcg")
        return AccelChoice("hvf", "macOS Hypervisor.framework")
    usable, why = _kvm_usable()
    if not usable:
        if requested == "kvm":
            raise ConfigError("accel", "kvm", why + "; or use accel=auto to fall back to TCG")
        return AccelChoice("tcg", why + "; using software emulation (TCG: slower, still isolated)")
    ok, reason, detail = _cached_probe(qemu, image)
    if ok:
        return AccelChoice("kvm", reason, detail)
    if requested == "kvm":
        raise ConfigError("accel", "kvm", f"{reason} ({detail}); use accel=auto or tcg")
    return AccelChoice("tcg", reason + "; using software emulation (TCG: slower, still isolated)", detail)


def _cached_probe(qemu: str, image: Image) -> tuple[bool, str, str]:
    """Probe once per host boot, QEMU binary and guest kernel."""
    cache = paths.private_dir(paths.state_dir()) / "accel-probe.json"
    key = f"{_boot_id()}|{qemu}|{os.stat(qemu).st_mtime_ns}|{image.kernel_release}"
    try:
        entry = json.loads(cache.read_text())
        if entry.get("key") == key and "detail" in entry:
            return bool(entry["ok"]), str(entry["reason"]), str(entry["detail"])
    except (OSError, ValueError, KeyError):
        pass
    ok, reason, detail = probe_kvm(qemu, image)
    # A temporary file of its own: VMs started at once in one process (threads)
    # probe at once, and a name made from the pid alone was shared by them.
    fd, tmp = tempfile.mkstemp(prefix="accel-probe.", suffix=".tmp", dir=cache.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"key": key, "ok": ok, "reason": reason, "detail": detail}))
    os.replace(tmp, cache)
    return ok, reason, detail
