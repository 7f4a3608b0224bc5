"""QEMU ``microvm`` backend: KVM or HVF where they work, TCG everywhere else.

The guest channel is a virtio-serial port on a host UNIX socket (QEMU's
vhost-vsock needs /dev/vhost-vsock, which many hosts lack).
"""

from __future__ import annotations

import asyncio
import os
import platform
import pwd
import shutil
import sys

from smolvm_kernel.backends.base import Backend, VMSpec, connect_unix, create_scratch_disk
from smolvm_kernel.errors import ToolNotFound

SERIAL_PORT_NAME = "org.smolvm.agent.0"


def qemu_argv(spec: VMSpec, binary: str, *, extra_cmdline: tuple[str, ...] = (),
              sandboxed: bool | None = None, runas: str | None = None) -> list[str]:
    """Build the QEMU command line for ``spec`` (pure: no files are touched)."""
    if sandboxed is None:
        sandboxed = sys.platform.startswith("linux")
    run = spec.run_dir
    if spec.accel == "tcg":
        # The default 1 GiB translation cache inflates QEMU's RSS by ~100 MB.
        accel = ["-accel", "tcg,tb-size=64", "-cpu", "max"]
    elif spec.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    elif spec.accel == "hvf":
        accel = ["-accel", "hvf", "-cpu", "host"]
    else:
        raise ValueError(f"unknown accelerator {spec.accel!r}")
    kernel = spec.image.vmlinuz
    argv = [
        binary,
        # ACPI stays on: this kernel finds virtio-mmio devices only through ACPI.
        "-M", "microvm,acpi=on,pit=off,pic=off,rtc=on,x-option-roms=off",
        *accel,
        "-smp", str(spec.vcpus), "-m", f"{spec.mem_mib}M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(spec.image.initramfs),
        "-append", spec.kernel_cmdline(extra_cmdline),
        "-chardev", f"file,id=console,path={spec.console_log}", "-serial", "chardev:console",
        "-drive", f"id=base,file={spec.image.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=base,serial=smolvm-base",
        "-drive", f"id=scratch,file={spec.scratch_disk},format=raw,if=none,cache=unsafe",
        "-device", "virtio-blk-device,drive=scratch,serial=smolvm-scratch",
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={run / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={SERIAL_PORT_NAME}",
        "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
    ]
    if sandboxed:
        # -runas needs setuid/setgid after the filter is installed; once QEMU
        # runs as that user those calls cannot regain anything.
        elevate = "allow" if runas else "deny"
        argv += ["-sandbox", f"on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"]
    if runas:
        argv += ["-runas", runas]
    return argv


def find_qemu(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise ToolNotFound(
            "QEMU (" + binary + ")",
            "qemu-system-x86 (Debian) or qemu (Homebrew)",
            "SandboxConfig.qemu_path (SMOLVM_QEMU)")
    return path


def unprivileged_user() -> str | None:
    """When run as root, QEMU drops to ``nobody`` once its files are open."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return None
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None
    return "nobody"


class QemuBackend(Backend):
    """A QEMU microvm process with a virtio-serial agent channel."""

    name = "qemu"
    channel_kind = "serial"

    async def launch(self) -> None:
        binary = find_qemu(self.binary)
        if platform.machine() not in ("x86_64", "AMD64"):
            from smolvm_kernel.errors import SmolVMError
            raise SmolVMError(f"the QEMU backend boots x86_64 guests; this host is {platform.machine()}")
        await asyncio.to_thread(create_scratch_disk, self.spec.scratch_disk, self.spec.disk_mib)
        runas = unprivileged_user()
        self.argv = qemu_argv(self.spec, binary, runas=runas)
        await self._spawn(self.argv, drops_privileges=runas is not None)

    async def open_channel(self, timeout: float):
        return await connect_unix(self.spec.run_dir / "agent.sock", timeout,
                                  lambda: self.poll() is None)
