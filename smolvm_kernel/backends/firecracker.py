"""Firecracker backend: a KVM microVM configured over its REST API, vsock channel.

Firecracker is configured, not launched with arguments: the process starts
with only ``--api-sock``, then the requests of firecracker_api.py are sent
over that UNIX socket (``boot_requests``, in Firecracker's boot order, by
which the guest tells its disks apart: that module says how).

The guest channel is Firecracker's *hybrid* vsock: Firecracker listens on
``<run_dir>/vsock.sock``; the host connects, writes ``CONNECT 1024\\n`` and,
once Firecracker answers ``OK <host_port>\\n``, the socket carries the byte
stream to the guest agent's AF_VSOCK listener on port 1024 (the agent picks
vsock because the kernel command line says ``smolvm.channel=vsock``).

Ready snapshots. ``save_snapshot`` (firecracker_api.py) pauses a running
template VM (PATCH /vm) and writes a Full snapshot (PUT /snapshot/create):
the device and vCPU state to one file, guest memory to another. A backend
built with ``restore=snapshot`` sends only ``restore_requests`` (a single
PUT /snapshot/load) to a fresh Firecracker instead of the boot sequence. The
memory file is mapped MAP_PRIVATE, so the load is near-instant and every
fork of one snapshot shares the pages it has not written. Limitation: the
drive paths are recorded in the snapshot and /snapshot/load cannot override
them (see :class:`FirecrackerBackend`).

Example::

    backend = FirecrackerBackend(spec, "firecracker")
    await backend.launch()
    reader, writer = await backend.open_channel(timeout=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

from smolvm_kernel.backends.base import (AGENT_VSOCK_PORT, Backend, VMSpec, connect_unix,
                                         create_scratch_disk)
from smolvm_kernel.backends.firecracker_api import (API_TIMEOUT_S, SNAPSHOT_TIMEOUT_S, VSOCK_UDS_NAME,
                                                    api_request, boot_requests, ctrl_alt_del_body,
                                                    restore_requests)
from smolvm_kernel.errors import CommandFailed, ConfigError, ProtocolError, SmolVMError, ToolNotFound

API_SOCK_NAME = "fc.sock"
#: ``OK 4294967295\n`` is 14 bytes; anything past 32 is not Firecracker.
MAX_VSOCK_OK_LINE = 32
MAX_VSOCK_PORT = 2**32 - 1
#: The API socket appears within ~10 ms of exec on a normal host.
API_READY_TIMEOUT_S = 5.0
#: One CONNECT round trip: Firecracker answers at once (OK, or closes the
#: connection when the guest port is not yet listening).
VSOCK_ATTEMPT_TIMEOUT_S = 2.0
#: The agent listens a few seconds after boot; retrying every 50 ms adds at
#: most that to the boot time and costs one guest RST per attempt.
VSOCK_RETRY_DELAY_S = 0.05
#: sockaddr_un.sun_path is 108 bytes on Linux, including the NUL.
_MAX_UNIX_PATH = 107
#: Kept in step with base.connect_unix: the channel reader carries whole frames.
_STREAM_LIMIT = 1 << 22

_VSOCK_OK = re.compile(rb"OK ([1-9][0-9]{0,9})\n")


# ----------------------------------------------------------- hybrid vsock

def parse_vsock_ok(line: bytes) -> int:
    """Return the host port from Firecracker's ``OK <port>\\n`` reply; raise ProtocolError otherwise."""
    match = _VSOCK_OK.fullmatch(line) if len(line) <= MAX_VSOCK_OK_LINE else None
    port = int(match.group(1)) if match else 0
    if not 1 <= port <= MAX_VSOCK_PORT:
        raise ProtocolError(
            f"Firecracker's vsock did not answer 'OK <port>': {line[:MAX_VSOCK_OK_LINE]!r}")
    return port


async def vsock_connect(uds_path: Path | str, port: int,
                        timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to guest vsock ``port`` through Firecracker's hybrid-vsock socket.

    Raises ``OSError`` when the socket is missing or the guest port is not
    (yet) listening (Firecracker then closes the connection without a reply),
    ``TimeoutError`` after ``timeout``, and :class:`ProtocolError` for a reply
    that is not ``OK <port>``. On any failure the socket is closed.
    """
    if not 1 <= port <= MAX_VSOCK_PORT:
        raise ValueError(f"vsock port {port} is out of range 1..{MAX_VSOCK_PORT}")

    async def handshake() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(str(uds_path), limit=_STREAM_LIMIT)
        try:
            writer.write(f"CONNECT {port}\n".encode("ascii"))
            await writer.drain()
            line = await _read_line(reader, MAX_VSOCK_OK_LINE)
            if not line:
                raise ConnectionResetError(f"nothing listens on guest vsock port {port} yet")
            parse_vsock_ok(line)
            return reader, writer
        except BaseException:  # cancellation too: no half-open socket left behind
            writer.close()
            raise

    return await asyncio.wait_for(handshake(), timeout)


async def _read_line(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Read up to ``limit`` bytes through the first newline, never past it."""
    # One byte at a time (from the reader's buffer): guest bytes may follow
    # the OK line in the same segment and belong to the channel.
    line = bytearray()
    while len(line) < limit:
        byte = await reader.read(1)
        if not byte:
            break
        line += byte
        if byte == b"\n":
            break
    return bytes(line)


# ---------------------------------------------------------------- backend

def firecracker_available(binary: str) -> tuple[bool, str]:
    """Say whether ``binary`` is on PATH and /dev/kvm opens read-write, and why not.

    This does not prove a guest boots: some nested hosts expose a /dev/kvm
    on which ordinary guest kernels hang (see backends/accel.py).
    """
    path = shutil.which(binary)
    if path is None:
        return False, f"{binary} not found on PATH"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, "/dev/kvm does not exist (no KVM on this host)"
    except PermissionError:
        return False, "/dev/kvm is not readable and writable by this user; add the user to the kvm group"
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror or exc}"
    os.close(fd)
    return True, f"{path} with /dev/kvm"


class FirecrackerBackend(Backend):
    """A Firecracker process configured over its API socket, with a hybrid-vsock channel.

    With ``restore`` (a :class:`~smolvm_kernel.vm.snapshot.Snapshot` whose folder
    holds ``state.bin``, ``scratch.img`` and ``memory.bin``, the last two
    written by :func:`save_snapshot`) the VM is not booted: the scratch disk
    is copied from the snapshot and a fresh Firecracker gets only PUT
    /snapshot/load (:func:`restore_requests`).

    Restore limitation, drive paths: a Firecracker snapshot records each
    drive's ``path_on_host`` and reopens exactly that path on load. The
    /snapshot/load schema (API 1.17.0-dev) can override the vsock socket
    (``vsock_override``) and TAP names (``network_overrides``) but has no
    drive override. So ``spec.image.rootfs`` must be the template's (it is:
    the image cache path) and ``spec.scratch_disk`` must be the very path the
    template's scratch disk had when it was saved. Two forks of one snapshot
    therefore cannot run side by side on one mount namespace, each with its
    own scratch copy; upstream's answer is the ``jailer``, whose per-VM chroot
    makes one path name a different file for each VM. (PATCH
    /drives/{drive_id} with a new ``path_on_host`` is post-boot only and swaps
    the backing file under a running guest; it is not used here.)

    ``drop_privileges`` is accepted for the same signature as QemuBackend and
    is currently unused: Firecracker has no ``-runas``; dropping privileges
    and seccomp confinement beyond its built-in filters are the jailer's job.
    """

    name = "firecracker"
    channel_kind = "vsock"

    def __init__(self, spec: VMSpec, binary: str, restore: Any = None,
                 drop_privileges: bool = True) -> None:
        super().__init__(spec, binary)
        self.restore = restore
        self.drop_privileges = drop_privileges

    @property
    def api_sock(self) -> Path:
        return self.spec.run_dir / API_SOCK_NAME

    @property
    def vsock_uds(self) -> Path:
        return self.spec.run_dir / VSOCK_UDS_NAME

    async def launch(self) -> None:
        """Start Firecracker, configure the VM and boot it. Called once by the Sandbox.

        Returns once ``InstanceStart`` is accepted; the guest agent listens a
        few seconds later (see :meth:`open_channel`). With ``restore`` it
        returns once /snapshot/load (with ``resume_vm``) is accepted and the
        guest runs again. On failure the VMM is killed; the Sandbox still
        calls :meth:`cleanup`.
        """
        binary = shutil.which(self.binary)
        if binary is None:
            raise ToolNotFound("firecracker", "a release binary from "
                               "https://github.com/firecracker-microvm/firecracker/releases",
                               "SandboxConfig.firecracker_path (SMOLVM_FIRECRACKER)")
        run = self.spec.run_dir
        for sock in (self.api_sock, self.vsock_uds):
            if len(os.fsencode(sock)) > _MAX_UNIX_PATH:
                raise ConfigError("run folder", str(run), f"socket path {sock} is longer than "
                                  f"{_MAX_UNIX_PATH} bytes; set SMOLVM_STATE_DIR to a shorter path")
            # Firecracker refuses to bind a path that already exists.
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        if self.restore is None:
            await asyncio.to_thread(create_scratch_disk, self.spec.scratch_disk, self.spec.disk_mib)
            requests = boot_requests(self.spec, run)
        else:
            from smolvm_kernel.backends.base import copy_sparse

            # The snapshot reopens the drive paths the template had: this copy
            # must land where the template's scratch disk was (class docstring).
            await asyncio.to_thread(copy_sparse, self.restore.scratch, self.spec.scratch_disk)
            requests = restore_requests(self.restore, run)
        # Firecracker writes the guest's serial console to its stdout, which
        # _spawn sends to vmm.log; console.log names the same file so that
        # console_tail() and anything reading spec.console_log find it.
        with contextlib.suppress(FileExistsError):
            self.spec.console_log.symlink_to("vmm.log")
        self.argv = [binary, "--api-sock", str(self.api_sock), "--id", self.spec.vm_id]
        await self._spawn(self.argv)
        try:
            await self._wait_api_ready()
            for method, path, body in requests:
                timeout = SNAPSHOT_TIMEOUT_S if path.startswith("/snapshot/") else API_TIMEOUT_S
                await api_request(self.api_sock, method, path, body, timeout=timeout)
        except BaseException:
            await self.kill()
            raise

    async def _wait_api_ready(self) -> None:
        """Wait until Firecracker accepts connections on its API socket."""
        try:
            _, writer = await connect_unix(self.api_sock, API_READY_TIMEOUT_S,
                                           lambda: self.poll() is None)
        except ConnectionError:
            code = self.poll()
            if code is not None:
                raise CommandFailed(self.argv, code, self.vmm_log_tail(),
                                    hint="Firecracker exited before opening its API socket") from None
            raise
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def open_channel(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the guest agent on vsock port 1024, retrying until ``timeout``.

        Called by the Sandbox after :meth:`launch`. After a restore this is
        the same path: the load resets every vsock connection
        (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), the template's channel is gone,
        and the agent's listener answers a fresh CONNECT. Raises ``ConnectionError``
        when the VMM exits or the agent does not answer in time, and
        :class:`ProtocolError` when Firecracker's reply is not ``OK <port>``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: BaseException | None = None
        while True:
            code = self.poll()
            if code is not None:
                raise ConnectionError(f"Firecracker exited with status {code} before the guest "
                                      f"agent answered on vsock port {AGENT_VSOCK_PORT}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                return await vsock_connect(self.vsock_uds, AGENT_VSOCK_PORT,
                                           min(remaining, VSOCK_ATTEMPT_TIMEOUT_S))
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
            await asyncio.sleep(min(VSOCK_RETRY_DELAY_S, max(0.0, deadline - loop.time())))
        raise ConnectionError(f"the guest agent did not answer on vsock port {AGENT_VSOCK_PORT} "
                              f"within {timeout:g} s (last error: {last!r})")

    async def terminate(self, grace: float = 2.0) -> None:
        """Ask the guest to shut down with Ctrl-Alt-Del, then fall back to SIGTERM and SIGKILL.

        Called by the Sandbox before :meth:`kill`. Ctrl-Alt-Del reaches the
        guest only through an i8042 keyboard (x86_64, and not with
        ``i8042.nokbd`` on the command line), so half of ``grace`` is given to
        it and the rest to the base class's SIGTERM path.
        """
        if self.proc is None or self.proc.returncode is not None:
            return
        loop = asyncio.get_running_loop()
        half = grace / 2
        deadline = loop.time() + half
        try:
            await api_request(self.api_sock, "PUT", "/actions", ctrl_alt_del_body(), timeout=half)
            await asyncio.wait_for(self.proc.wait(), max(0.0, deadline - loop.time()))
        except (OSError, SmolVMError, asyncio.TimeoutError):
            pass  # no API socket, refused (aarch64), or the guest ignored the keys
        await super().terminate(grace=half)
        self.poll()  # the base returns early, state untouched, if the guest already halted
