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

from smolvm_guest import wire
from smolvm_kernel import timeline
from smolvm_kernel.backends.base import (AGENT_VSOCK_PORT, Backend, VMSpec, connect_unix, connect_vsock,
                                         create_scratch_disk)
from smolvm_kernel.errors import SmolVMError, ToolNotFound



def qemu_argv(spec: VMSpec, binary: str, *, extra_cmdline: tuple[str, ...] = (),
              sandboxed: bool | None = None, runas: str | None = None,
              drive_fds: dict[str, int] | None = None) -> list[str]:
    """Build the QEMU command line for ``spec`` (pure: no files are touched).

    With ``drive_fds`` ({"base", "scratch", "scratch_ro"}: fds) the disks are handed over
    as already-open descriptors (``-add-fd``): a QEMU that dropped to another
    user can then still reopen them, as loading a snapshot requires.
    """
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
    base_file, scratch_file, add_fds, scratch_opts = spec.image.rootfs, spec.scratch_disk, [], ""
    if drive_fds:
        # Both descriptors of the private scratch disk live in this one QEMU;
        # its image locks would only trip over each other.
        scratch_opts = ",file.locking=off"
        base_file, scratch_file = "/dev/fdset/1", "/dev/fdset/2"
        # An fdset is searched by access mode: the scratch disk is opened
        # read-only while an incoming VM's disks are still inactive.
        add_fds = ["-add-fd", f"fd={drive_fds['base']},set=1",
                   "-add-fd", f"fd={drive_fds['scratch']},set=2",
                   "-add-fd", f"fd={drive_fds['scratch_ro']},set=2"]
    machine = "microvm,acpi=on,pit=off,pic=off,rtc=on,x-option-roms=off"
    ram: list[str] = []
    if spec.ram_file is not None:
        # RAM lives in a file: a snapshot's state then leaves it out
        # (x-ignore-shared), and its forks map it copy-on-write, sharing every
        # page they have not written through the host's page cache.
        machine += ",memory-backend=ram0"
        ram = ["-object", f"memory-backend-file,id=ram0,size={spec.mem_mib}M,mem-path={spec.ram_file},"
                          f"share={'on' if spec.ram_shared else 'off'}"]
    elif spec.ram_named:
        machine += ",memory-backend=ram0"
        ram = ["-object", f"memory-backend-ram,id=ram0,size={spec.mem_mib}M"]
    argv = [
        binary,
        *add_fds,
        # ACPI stays on: this kernel finds virtio-mmio devices only through ACPI.
        "-M", machine, *ram,
        *accel,
        "-smp", str(spec.vcpus), "-m", f"{spec.mem_mib}M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(spec.image.initramfs),
        "-append", spec.kernel_cmdline(extra_cmdline),
        "-chardev", f"file,id=console,path={spec.console_log},append=on", "-serial", "chardev:console",
        "-drive", f"id=base,file={base_file},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=base,serial=smolvm-base",
        "-drive", f"id=scratch,file={scratch_file},format=raw,if=none,cache=unsafe{scratch_opts}",
        "-device", "virtio-blk-device,drive=scratch,serial=smolvm-scratch",
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng",
        # Memory can shrink (and grow back to the boot size) while the VM runs.
        "-device", "virtio-balloon-device",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={run / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={wire.SERIAL_PORT_NAME}",
        "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
    ]
    if spec.seed is not None:
        seed_file = str(spec.seed)
        if drive_fds and "seed" in drive_fds:
            seed_file = "/dev/fdset/3"
            argv[1:1] = ["-add-fd", f"fd={drive_fds['seed']},set=3"]
        argv += ["-drive", f"id=seed,file={seed_file},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=seed,serial=smolvm-seed"]
    if spec.tap_fd is not None:
        argv += ["-netdev", f"tap,id=net0,fd={spec.tap_fd},vhost=off",
                 "-device", f"virtio-net-device,netdev=net0,mac={spec.mac}"]
    elif spec.nic:
        # A ready snapshot's template: the same NIC its forks get, on a hub
        # port that leads nowhere (the forks' TAP replaces it; a netdev is the
        # host's side and not part of the saved state).
        argv += ["-netdev", "hubport,id=net0,hubid=0", "-device", "virtio-net-device,netdev=net0"]
    if spec.transport == "vsock":
        argv += ["-device", f"vhost-vsock-device,guest-cid={spec.vsock_cid}"]
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
    """A QEMU microvm process with a virtio-serial agent channel.

    With ``restore`` (a :class:`~smolvm_kernel.vm.snapshot.Snapshot`) the VM is
    not booted but loaded from the saved state (``-incoming``), with its own
    copy of the snapshot's scratch disk; the device command line is the same.
    A restore whose ``scratch`` is None (a VM paused to disk, pause.py) keeps
    the disk already in the VM's folder.
    """

    name = "qemu"
    channel_kind = "serial"     # or vsock / ssh, per VMSpec.transport

    def __init__(self, spec: VMSpec, binary: str, restore=None, drop_privileges: bool = True,
                 start_after_load: bool = True) -> None:
        super().__init__(spec, binary)
        self.restore = restore
        #: False: a loaded VM stays stopped (a checkpoint turned into a RAM
        #: file, vm/checkpoints.py: its guest must not run a single step).
        self.start_after_load = start_after_load
        #: Saving state makes QEMU reopen its disks by path, which an
        #: unprivileged QEMU cannot do in root's private folders; the template
        #: VM of a snapshot runs no user code, so it keeps its privileges.
        self.drop_privileges = drop_privileges

    async def launch(self) -> None:
        binary = find_qemu(self.binary)
        if platform.machine() not in ("x86_64", "AMD64"):
            from smolvm_kernel.errors import SmolVMError
            raise SmolVMError(f"the QEMU backend boots x86_64 guests; this host is {platform.machine()}")
        runas = unprivileged_user() if self.drop_privileges else None
        if self.restore is None:
            await asyncio.to_thread(create_scratch_disk, self.spec.scratch_disk, self.spec.disk_mib)
        elif self.restore.scratch is not None:
            from smolvm_kernel.backends.base import copy_sparse

            await asyncio.to_thread(copy_sparse, self.restore.scratch, self.spec.scratch_disk)
        fds = {"base": os.open(self.spec.image.rootfs, os.O_RDONLY),
               "scratch": os.open(self.spec.scratch_disk, os.O_RDWR),
               "scratch_ro": os.open(self.spec.scratch_disk, os.O_RDONLY)}
        if self.spec.seed is not None:
            fds["seed"] = os.open(self.spec.seed, os.O_RDONLY)
        file_ram = self.restore is not None and self._ignore_shared()
        if self.restore is not None and not file_ram:
            fds["state"] = os.open(self.restore.state, os.O_RDONLY)
        try:
            self.argv = qemu_argv(self.spec, binary, runas=runas, drive_fds=fds)
            if file_ram:
                # The stream was saved with x-ignore-shared, which QEMU 7.2 can
                # only switch on over QMP: wait for it, then load (see below).
                self.argv += ["-incoming", "defer"]
            elif self.restore is not None:
                self.argv += ["-incoming", f"fd:{fds['state']}"]
            passed = tuple(fds.values()) + ((self.spec.tap_fd,) if self.spec.tap_fd is not None else ())
            ram_fd = getattr(self.restore, "ram_fd", None)
            if ram_fd is not None:
                # hostd's sealed memfd of the snapshot's RAM (classroom/sharedram.py):
                # mem-path is /proc/self/fd/<it>, at the same number in QEMU.
                passed += (ram_fd,)
            await self._spawn(self.argv, drops_privileges=runas is not None, pass_fds=passed)
            timeline.mark("QEMU spawned")
        finally:
            for fd in fds.values():
                os.close(fd)
        if self.restore is not None:
            await asyncio.to_thread(self._resume_after_load)

    def _ignore_shared(self) -> bool:
        """Whether the stream being loaded was saved with x-ignore-shared: a
        snapshot's (its RAM is a file), and a paused VM's (pause.PausedState:
        a pause saves with it on, and a stream carries it)."""
        said = getattr(self.restore, "ignore_shared", None)     # a checkpoint's says (checkpoints.Load)
        return bool(said) if said is not None else self.spec.ram_file is not None

    def _resume_after_load(self, timeout: float = 30.0) -> None:
        """The template was paused when saved; run the loaded VM once it is in."""
        from smolvm_kernel.errors import SmolVMError

        try:
            self._wait_loaded_and_cont(timeout)
        except (OSError, ValueError) as exc:   # QEMU died mid-load: a bad snapshot
            import time
            time.sleep(0.1)
            raise SmolVMError(f"loading the snapshot failed ({exc}): {self.vmm_log_tail().strip()}") from None

    def _wait_loaded_and_cont(self, timeout: float) -> None:
        import time

        from smolvm_kernel.backends.qmp import QMP
        from smolvm_kernel.errors import SmolVMError

        deadline = time.monotonic() + timeout
        qmp = None
        while qmp is None:
            try:
                qmp = QMP(self.spec.run_dir / "qmp.sock")
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or (self.proc and self.proc.returncode is not None):
                    raise SmolVMError("QEMU exited while loading the snapshot: "
                                      + self.vmm_log_tail()) from None
                # QEMU opens its QMP socket ~30 ms after exec; every ms of
                # this wait is a ms of every restore.
                time.sleep(0.002)
        with qmp:
            if self._ignore_shared():
                # The RAM file is not in the stream; and say when the load ends,
                # instead of being polled for it.
                qmp.enable_migration("x-ignore-shared", "events")
                fd = os.open(self.restore.state, os.O_RDONLY)
                try:
                    qmp.execute("getfd", {"fdname": "snapshot"}, fds=[fd])
                finally:
                    os.close(fd)
                qmp.execute("migrate-incoming", {"uri": "fd:snapshot"})
                event = qmp.wait_event("MIGRATION", lambda data: data.get("status") in ("completed", "failed"),
                                       max(0.1, deadline - time.monotonic()))
                if event["data"]["status"] == "failed":
                    raise SmolVMError(f"loading the snapshot failed: {self.vmm_log_tail().strip()}")
            while True:
                status = qmp.execute("query-status")["status"]
                if status != "inmigrate":
                    break
                if time.monotonic() > deadline:
                    raise SmolVMError(f"loading the snapshot took over {timeout:.0f} s")
                time.sleep(0.01)
            if status in ("paused", "postmigrate", "prelaunch"):
                if self.start_after_load:
                    qmp.execute("cont")
            elif status != "running":
                raise SmolVMError(f"the loaded VM is in state {status!r}: {self.vmm_log_tail()}")

    def balloon_refusal(self) -> str | None:
        """Why this VM's balloon must not take memory back (None: it may).

        A VM restored from a ready snapshot maps the snapshot's RAM file
        privately, and every other VM of that snapshot maps the same file.
        QEMU 7.2 frees ballooned RAM of a file-backed block by punching a hole
        in the file (ram_block_discard_range), private mapping or not: the
        other VMs then read zeros where their memory was, and die (measured:
        a second fork's init got SIGSEGV), and so does every later restore.
        A VM that cold-booted, or was paused and resumed (anonymous RAM), may."""
        if self.spec.ram_file is not None and not self.spec.ram_shared:
            return ("this VM's memory is mapped from the ready snapshot that other VMs share, and QEMU 7.2's "
                    "balloon would punch holes in that file")
        return None

    def set_memory(self, mib: int) -> int:
        """Inflate or deflate the balloon so the guest has ``mib`` MiB (at most its
        boot size); returns what QEMU reports as the guest's memory now, in MiB."""
        import time

        from smolvm_kernel.backends.qmp import QMP

        why = self.balloon_refusal()
        if why is not None:
            raise SmolVMError(f"the balloon was not used: {why}")

        target = min(mib, self.spec.mem_mib) * 2**20
        with QMP(self.spec.run_dir / "qmp.sock") as qmp:
            qmp.execute("balloon", {"value": target})
            deadline = time.monotonic() + 10
            actual = qmp.execute("query-balloon")["actual"]
            while actual != target and time.monotonic() < deadline:
                time.sleep(0.1)
                actual = qmp.execute("query-balloon")["actual"]
        return actual // 2**20

    async def open_channel(self, timeout: float):
        if self.spec.transport == "vsock":
            return await connect_vsock(self.spec.vsock_cid, AGENT_VSOCK_PORT, timeout, lambda: self.poll() is None)
        return await connect_unix(self.spec.run_dir / "agent.sock", timeout,
                                  lambda: self.poll() is None)
