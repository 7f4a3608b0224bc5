"""The backend contract: one VMM process with a Popen-shaped async lifecycle.

Modelled on jupyter_client's KernelProvisionerBase. The Sandbox calls, in
order: :meth:`Backend.launch`, :meth:`Backend.open_channel`, then any of
:meth:`poll`/:meth:`wait`/:meth:`send_signal`, and finally
:meth:`terminate` or :meth:`kill` followed by :meth:`cleanup`. Killing and
cleaning up twice is safe.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import dataclasses
import enum
import os
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

from smolvm_guest import wire
from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.host.cgroups import VMGroup
from smolvm_kernel.images import Image

_PR_SET_PDEATHSIG = 1
#: The guest agent's AF_VSOCK listener.
AGENT_VSOCK_PORT = wire.VSOCK_PORT
#: The console and VMM logs in a VM's run folder are cut back to their last
#: LOG_KEEP_BYTES once they pass LOG_CAP_BYTES (see Backend.cap_logs): root in
#: the guest can print to its console without end.
LOG_CAP_BYTES = 1024 * 1024
LOG_KEEP_BYTES = 256 * 1024


class VMState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


@dataclasses.dataclass
class VMSpec:
    """Everything a backend needs to start one VM."""

    vm_id: str
    run_dir: Path
    image: Image
    vcpus: int = 2
    mem_mib: int = 512
    disk_mib: int = 2048
    accel: str = "tcg"
    debug_console: bool = False
    #: Host TSC frequency; passed to a TCG guest (see kernel_cmdline).
    tsc_khz: int | None = None
    #: How the host reaches the agent: "serial", "vsock" or "ssh".
    transport: str = "serial"
    #: The VM has one NIC (network="nat"): a snapshot's template has it too, so
    #: that its forks can have one; only a VM with a TAP connects it to anything.
    nic: bool = False
    #: An open TAP descriptor for the VM's one NIC (network="nat"), and its MAC.
    tap_fd: int | None = None
    tap_name: str | None = None
    mac: str | None = None
    #: The seed disk (network address, SSH keys), when there is one.
    seed: Path | None = None
    #: The guest's vsock context id (vsock transport).
    vsock_cid: int | None = None
    #: Guest RAM backed by this file (ready snapshots): shared and written
    #: through by a snapshot's template VM, mapped copy-on-write by its forks.
    ram_file: Path | None = None
    ram_shared: bool = False
    #: Anonymous guest RAM under the name a file-backed one has (a VM forked
    #: from a snapshot and then paused to disk resumes with it: a saved state
    #: loads only into RAM of the name it was saved from).
    ram_named: bool = False
    #: The VMM's own cgroup (memory, CPU and pids limits); None where the host has none.
    cgroup: VMGroup | None = None

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def scratch_disk(self) -> Path:
        return self.run_dir / "scratch.img"

    def kernel_cmdline(self, extra: tuple[str, ...] = ()) -> str:
        args = ["console=ttyS0", "reboot=t", "panic=-1", "pci=off", "i8042.noaux", "i8042.nokbd",
                "8250.nr_uarts=1", "random.trust_bootloader=on",
                # Freed pages are zeroed, so a snapshot skips them (QEMU does
                # not send zero pages) and loads faster.
                "init_on_free=1"]
        args.append("loglevel=7" if self.debug_console else "loglevel=4 quiet")
        if self.accel == "tcg" and self.tsc_khz:
            # Without these, about 1 cold TCG boot in 15 hangs after "tsc: Unable
            # to calibrate against PIT": the emulated PIT races the host clock.
            # The guest TSC runs at the host's rate under TCG, so tell it.
            args += [f"tsc_early_khz={self.tsc_khz}", "tsc=reliable"]
        if self.transport != "serial":
            args.append(f"smolvm.channel={self.transport}")
        return " ".join(args + list(extra))


def create_scratch_disk(path: Path, size_mib: int) -> None:
    """Make a sparse ext4 file: it costs only the blocks the guest writes."""
    with open(path, "wb") as fh:
        fh.truncate(size_mib * 1024 * 1024)
    proc = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard",
         "-L", "smolvm-scratch", "-m", "0", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        from smolvm_kernel.errors import CommandFailed
        raise CommandFailed(["mkfs.ext4", str(path)], proc.returncode, proc.stderr,
                            hint="install e2fsprogs")


def die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when the thread that forked it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()  # an interrupt meant for the host kernel must not hit the VMM


#: Runs as ``sh -c _WATCHDOG <vmm pid> [cgroup dir...]``: on SIGTERM (its parent
#: died) it kills the VMM, waits for it to go and removes its cgroup folders;
#: it exits by itself once the VMM is gone.
_WATCHDOG = ('trap \'kill -KILL "$0" 2>/dev/null; n=0; '
             'while kill -0 "$0" 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done; '
             'for d; do rmdir "$d" 2>/dev/null; done; exit 0\' TERM; '
             'while kill -0 "$0" 2>/dev/null; do sleep 1 & wait $!; done')


def _vmm_preexec(group: VMGroup | None):
    def preexec() -> None:
        if group is not None:
            group.join()     # before exec: every page the VMM touches is charged there
        die_with_parent()
    return preexec


def _watchdog_preexec() -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    os.setsid()


class Backend(abc.ABC):
    """One VMM process. Subclasses implement :meth:`launch` and :meth:`open_channel`."""

    name: ClassVar[str]
    #: Transport the guest agent uses with this backend ("serial" or "vsock").
    channel_kind: ClassVar[str]

    def __init__(self, spec: VMSpec, binary: str) -> None:
        self.spec = spec
        self.binary = binary
        self.proc: asyncio.subprocess.Process | None = None
        self.state = VMState.CREATED
        self._killed = False
        self._watchdog: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @abc.abstractmethod
    async def launch(self) -> None:
        """Start the VMM. Called once by the Sandbox; returns when the process runs."""

    @abc.abstractmethod
    async def open_channel(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the guest agent's byte stream. Called by the Sandbox after launch."""

    async def _spawn(self, argv: list[str], drops_privileges: bool = False,
                     pass_fds: tuple[int, ...] = ()) -> None:
        """Start ``argv`` tied to this process's life; stdout/stderr go to vmm.log.

        Linux clears the parent-death signal when a process changes its
        credentials, so a VMM that drops to another user (QEMU's -runas) gets
        a watchdog: a shell that carries the signal and kills the VMM.
        """
        log = open(self.spec.run_dir / "vmm.log", "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_vmm_preexec(self.spec.cgroup), close_fds=True, pass_fds=pass_fds)
        finally:
            log.close()
        self.state = VMState.RUNNING
        if drops_privileges:
            self._watchdog = subprocess.Popen(
                ["/bin/sh", "-c", _WATCHDOG, str(self.proc.pid),
                 *(str(d) for d in (self.spec.cgroup.dirs if self.spec.cgroup else ()))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_watchdog_preexec, close_fds=True)

    def balloon_refusal(self) -> str | None:
        """Why this VM's memory must not be changed live (None: it may, where
        the backend has ``set_memory``)."""
        return None

    def poll(self) -> int | None:
        """Return the exit code, or None while the VMM runs."""
        if self.proc is None:
            return None
        code = self.proc.returncode
        if code is not None:
            self.state = VMState.EXITED
        return code

    async def wait(self) -> int:
        """Wait for the VMM to exit and return its exit code."""
        assert self.proc is not None, "wait() before launch()"
        code = await self.proc.wait()
        self.state = VMState.EXITED
        return code

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def terminate(self, grace: float = 2.0) -> None:
        """Ask the VMM to exit, then kill it after ``grace`` seconds."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except asyncio.TimeoutError:
            await self.kill()
        self.state = VMState.EXITED

    async def kill(self) -> None:
        """SIGKILL the VMM; safe to call twice or before launch."""
        if self._killed or self.proc is None:
            return
        self._killed = True
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.state = VMState.EXITED
        self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.poll() is None:
            self._watchdog.kill()
            self._watchdog.wait()

    async def cleanup(self) -> None:
        """Remove the VM's run folder (scratch disk, sockets, logs). Idempotent."""
        import shutil

        self._stop_watchdog()
        shutil.rmtree(self.spec.run_dir, ignore_errors=True)
        if self.spec.cgroup is not None and (self.proc is None or self.proc.returncode is not None):
            await asyncio.to_thread(self.spec.cgroup.remove)

    def console_tail(self, limit: int = 4000) -> str:
        """The end of the guest's serial console, for error messages."""
        try:
            with open(self.spec.console_log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - limit))
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no console output)"
        return text.strip() or "(no console output)"

    def cap_logs(self) -> int:
        """Cut the console and VMM logs back to their tails if they grew past
        LOG_CAP_BYTES; returns the bytes cut. Cheap when nothing is cut (a stat
        each): the Sandbox calls it every few seconds while the VM runs."""
        paths = {p.resolve() for p in (self.spec.console_log, self.spec.run_dir / "vmm.log")}
        return sum(cap_file(p, LOG_CAP_BYTES, LOG_KEEP_BYTES) for p in paths)

    def vmm_log_tail(self, limit: int = 2000) -> str:
        try:
            return (self.spec.run_dir / "vmm.log").read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""


def cap_file(path: Path, cap: int, keep: int) -> int:
    """If ``path`` is over ``cap`` bytes, leave a line saying how much was cut and
    its last ``keep`` bytes; returns the bytes cut. The VMM writes its logs with
    O_APPEND (QEMU's chardev append=on, the host's open for stdout), so its
    next write lands after what is kept, not at its old offset (a write that
    falls between the cut and the note lands before the note)."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return 0
    if size <= cap:
        return 0
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, keep, max(0, size - keep))
        cut = size - len(tail)
        os.ftruncate(fd, 0)
        os.write(fd, f"[smolvm: {cut} earlier bytes of this log were cut]\n".encode() + tail)
    finally:
        os.close(fd)
    return cut


def write_seed(path: Path, seed: dict) -> None:
    """The seed disk: a 4-byte length, the JSON, zero padding to a whole sector."""
    import json
    import struct

    body = json.dumps(seed).encode()
    data = struct.pack("!I", len(body)) + body
    data += b"\0" * (-len(data) % 4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


async def connect_vsock(cid: int, port: int, timeout: float, proc_alive):
    """Connect to the guest's AF_VSOCK listener (QEMU vhost-vsock), retrying until ``timeout``."""
    import socket

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Exception | None = None
    while loop.time() < deadline and proc_alive():
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (cid, port)), 2.0)
            return await asyncio.open_connection(sock=sock, limit=1 << 22)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last = exc
            await asyncio.sleep(0.05)
    raise ConnectionError(f"could not connect to vsock {cid}:{port}: {last}")


async def connect_unix(path: Path, timeout: float, proc_alive) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a UNIX socket the VMM creates, retrying until ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Exception | None = None
    while loop.time() < deadline:
        if not proc_alive():
            break
        try:
            return await asyncio.open_unix_connection(str(path), limit=1 << 22)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            last = exc
            await asyncio.sleep(0.01)
    raise ConnectionError(f"could not connect to {path}: {last}")


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy a disk image keeping holes (and sharing extents where the FS can)."""
    proc = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SmolVMError(f"copying the snapshot disk failed: {proc.stderr.strip()}")
