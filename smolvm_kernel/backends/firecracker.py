"""Firecracker backend: a KVM microVM configured over its REST API, vsock channel.

Firecracker is configured, not launched with arguments: the process starts
with only ``--api-sock``, then :func:`boot_requests` are sent over that UNIX
socket in Firecracker's boot order (machine config, boot source, drives,
vsock, entropy, ``InstanceStart``). The request bodies are pure functions so
the unit tests can check each one, without a Firecracker binary, against
``firecracker_contract.json`` beside this module: the endpoints and bodies
this backend uses, written from Firecracker's published API.

The guest channel is Firecracker's *hybrid* vsock: Firecracker listens on
``<run_dir>/vsock.sock``; the host connects, writes ``CONNECT 1024\\n`` and,
once Firecracker answers ``OK <host_port>\\n``, the socket carries the byte
stream to the guest agent's AF_VSOCK listener on port 1024 (the agent picks
vsock because the kernel command line says ``smolvm.channel=vsock``).

Disk identification in the guest. QEMU gives each virtio-blk disk a serial
(``smolvm-base``, ``smolvm-scratch``) and the initramfs finds the disks by
``/sys/block/vd*/serial``. Firecracker's ``Drive`` schema has no serial
field: ``drive_id`` is a host-side name only, ``partuuid`` applies only to a
root device. Firecracker still answers the virtio-blk GET_ID request, so
``/sys/block/vdX/serial`` exists, but it holds ``<st_dev><st_rdev><st_ino>``
of the backing file (kvmtool's scheme), not a name the guest could match.
So under Firecracker the guest must fall back to device order: drives are
attached in the order they are PUT and no drive is the root device, so
``vda`` is the first drive (``base``, the read-only image) and ``vdb`` the
second (``scratch``). ``/sys/block/vdX/ro`` (1 for ``base``, which carries
VIRTIO_BLK_F_RO) confirms the choice without relying on order.

Ready snapshots. :func:`save_snapshot` pauses a running template VM
(PATCH /vm) and writes a Full snapshot (PUT /snapshot/create): the device
and vCPU state to one file, guest memory to another. A backend built with
``restore=snapshot`` sends only :func:`restore_requests` (a single PUT
/snapshot/load) to a fresh Firecracker instead of the boot sequence. The
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
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from smolvm_kernel.backends.base import (AGENT_VSOCK_PORT, Backend, VMSpec, connect_unix,
                                         create_scratch_disk)
from smolvm_kernel.errors import (CommandFailed, ConfigError, ProtocolError, SmolVMError,
                                  ToolNotFound)

API_SOCK_NAME = "fc.sock"
VSOCK_UDS_NAME = "vsock.sock"
#: CIDs 0-2 are reserved (hypervisor, local, host); 3 is the first guest CID.
#: Each Firecracker has its own vsock device, so every VM can use 3.
GUEST_CID = 3

#: The VMM is not trusted either: a compromised Firecracker must not make the
#: host buffer without bound. Real API answers are a few hundred bytes.
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
#: ``OK 4294967295\n`` is 14 bytes; anything past 32 is not Firecracker.
MAX_VSOCK_OK_LINE = 32
MAX_VSOCK_PORT = 2**32 - 1

#: Firecracker answers every configuration call in milliseconds; ten seconds
#: only matters on a host so loaded that the boot would time out anyway.
API_TIMEOUT_S = 10.0
#: Creating a Full snapshot writes all guest memory to a file (hundreds of MB);
#: loading one maps files but may read the state file from a cold cache.
SNAPSHOT_TIMEOUT_S = 120.0
#: Name of the guest-memory file in a snapshot folder (beside Snapshot.state).
SNAPSHOT_MEMORY_NAME = "memory.bin"
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

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
_VSOCK_OK = re.compile(rb"OK ([1-9][0-9]{0,9})\n")
_TOKEN = re.compile(r"[A-Z]+")


class FirecrackerAPIError(SmolVMError, RuntimeError):
    """Firecracker's API refused a request (non-2xx), or gave no answer (status 0)."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        self.method, self.path, self.status, self.fault_message = method, path, status, fault_message
        what = f"HTTP {status}" if status else "no answer"
        super().__init__(
            f"Firecracker API {method} {path} failed ({what}): {fault_message}; "
            f"vmm.log in the VM's run folder has Firecracker's side")


# ---------------------------------------------------------------- payloads

def machine_config_body(spec: VMSpec) -> dict[str, Any]:
    """Return the PUT /machine-config body: vCPUs and memory."""
    # smt stays off (the default): with it, Firecracker wants an even vCPU count.
    return {"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib, "smt": False}


def boot_source_body(spec: VMSpec) -> dict[str, Any]:
    """Return the PUT /boot-source body: ELF kernel, initramfs, command line."""
    return {
        # x86_64 Firecracker loads an uncompressed ELF, not the bzImage QEMU takes.
        "kernel_image_path": str(spec.image.vmlinux),
        "initrd_path": str(spec.image.initramfs),
        # The agent is reached over vsock (or over SSH, when the VM has a NIC for it).
        "boot_args": dataclasses.replace(spec, transport="ssh" if spec.transport == "ssh" else "vsock"
                                         ).kernel_cmdline(),
    }


def drive_body(drive_id: str, path: Path | str, read_only: bool) -> dict[str, Any]:
    """Return the PUT /drives/{drive_id} body for a virtio-blk disk backed by ``path``."""
    # Not a root device: the initramfs mounts the disks itself, and a root
    # device would be moved to the front and get root=/dev/vda appended.
    return {"drive_id": drive_id, "path_on_host": str(path), "is_root_device": False,
            "is_read_only": read_only}


def vsock_body(uds_path: Path | str) -> dict[str, Any]:
    """Return the PUT /vsock body: Firecracker binds ``uds_path`` for host connections."""
    return {"guest_cid": GUEST_CID, "uds_path": str(uds_path)}


def network_interface_body(tap_name: str, mac: str | None) -> dict[str, Any]:
    """Return the PUT /network-interfaces/net0 body: the VM's one NIC on the host's TAP."""
    body: dict[str, Any] = {"iface_id": "net0", "host_dev_name": tap_name}
    if mac:
        body["guest_mac"] = mac
    return body


def entropy_body() -> dict[str, Any]:
    """Return the PUT /entropy body: a virtio-rng device, not rate-limited."""
    return {}


def instance_start_body() -> dict[str, Any]:
    """Return the PUT /actions body that boots the configured VM."""
    return {"action_type": "InstanceStart"}


def ctrl_alt_del_body() -> dict[str, Any]:
    """Return the PUT /actions body that asks the guest to reboot (x86_64 only)."""
    return {"action_type": "SendCtrlAltDel"}


def boot_requests(spec: VMSpec, run_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """Return every (method, path, body) that configures and starts ``spec``, in order."""
    requests = [
        ("PUT", "/machine-config", machine_config_body(spec)),
        ("PUT", "/boot-source", boot_source_body(spec)),
        # Order matters: the guest identifies the disks by it (see the module docstring).
        ("PUT", "/drives/base", drive_body("base", spec.image.rootfs, read_only=True)),
        ("PUT", "/drives/scratch", drive_body("scratch", spec.scratch_disk, read_only=False)),
    ]
    if spec.seed is not None:   # third drive: the guest finds it by its content
        requests.append(("PUT", "/drives/seed", drive_body("seed", spec.seed, read_only=True)))
    if spec.tap_name is not None:
        requests.append(("PUT", "/network-interfaces/net0", network_interface_body(spec.tap_name, spec.mac)))
    return requests + [
        ("PUT", "/vsock", vsock_body(run_dir / VSOCK_UDS_NAME)),
        ("PUT", "/entropy", entropy_body()),
        ("PUT", "/actions", instance_start_body()),
    ]


def pause_vm_body() -> dict[str, Any]:
    """Return the PATCH /vm body that pauses the vCPUs (required before /snapshot/create)."""
    return {"state": "Paused"}


def snapshot_create_body(state_path: Path | str, mem_path: Path | str) -> dict[str, Any]:
    """Return the PUT /snapshot/create body: a Full snapshot to ``state_path`` + ``mem_path``."""
    # Full, not Diff: a Diff snapshot holds only pages dirtied since the last
    # one and needs track_dirty_pages; a ready snapshot is written once.
    return {"snapshot_type": "Full", "snapshot_path": str(state_path),
            "mem_file_path": str(mem_path)}


def snapshot_load_body(state_path: Path | str, mem_path: Path | str, *,
                       vsock_uds: Path | str | None = None) -> dict[str, Any]:
    """Return the PUT /snapshot/load body: load ``state_path`` + ``mem_path`` and resume.

    The memory comes in through the ``mem_backend`` File form (the older
    top-level ``mem_file_path`` is deprecated; the schema forbids both at
    once). Firecracker maps that file MAP_PRIVATE: loading copies nothing, and
    forks of one snapshot share every page they have not written.

    ``vsock_uds`` rebinds the hybrid-vsock socket (``vsock_override``):
    without it the restored VM would bind the template's ``uds_path``, in the
    template's run folder. The schema offers no such override for drives.
    """
    body: dict[str, Any] = {
        "snapshot_path": str(state_path),
        "mem_backend": {"backend_type": "File", "backend_path": str(mem_path)},
        "resume_vm": True,
    }
    if vsock_uds is not None:
        body["vsock_override"] = {"uds_path": str(vsock_uds)}
    return body


def restore_requests(restore: Any, run_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """Return every (method, path, body) that loads and resumes ``restore`` (a Snapshot).

    Only one request: /snapshot/load is accepted only by a fresh Firecracker
    (nothing but the logger and metrics configured), and the machine config,
    boot source, drives, vsock and entropy device all come from the snapshot.
    """
    return [("PUT", "/snapshot/load",
             snapshot_load_body(restore.state, Path(restore.directory) / SNAPSHOT_MEMORY_NAME,
                                vsock_uds=run_dir / VSOCK_UDS_NAME))]


# ------------------------------------------------------------- API client

async def api_request(sock_path: Path | str, method: str, path: str,
                      body: dict[str, Any] | None = None, *,
                      timeout: float = API_TIMEOUT_S) -> dict[str, Any] | None:
    """Send one HTTP/1.1 request to Firecracker's API socket and return the JSON answer.

    Returns the decoded body of a 2xx answer, or None when it has none (204).
    Raises :class:`FirecrackerAPIError` for a non-2xx status or no answer within
    ``timeout``, :class:`ProtocolError` for a malformed or oversized answer, and
    ``OSError`` when the socket cannot be reached.
    """
    if not _TOKEN.fullmatch(method) or not path.startswith("/") or re.search(r"[\s\x00-\x1f\x7f]", path):
        raise ValueError(f"refusing to send a malformed request line: {method!r} {path!r}")
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Accept: application/json"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload

    async def exchange() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_unix_connection(str(sock_path), limit=MAX_HEADER_BYTES)
        try:
            writer.write(request)
            await writer.drain()
            return await _read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        status, raw = await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise FirecrackerAPIError(method, path, 0, f"no response within {timeout:g} s") from None

    decoded: Any = None
    if raw:
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
    if not 200 <= status < 300:
        if isinstance(decoded, dict) and isinstance(decoded.get("fault_message"), str):
            fault = decoded["fault_message"]
        else:
            fault = raw[:500].decode(errors="replace") or "(no fault_message)"
        raise FirecrackerAPIError(method, path, status, fault)
    if not raw:
        return None
    if not isinstance(decoded, dict):
        raise ProtocolError(f"Firecracker answered {method} {path} with a body that is not a "
                            f"JSON object: {raw[:200]!r}")
    return decoded


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response with bounded headers and body; return (status, body)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"Firecracker's response headers exceed {MAX_HEADER_BYTES} bytes") from None
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"Firecracker closed the API connection mid-response "
                            f"after {len(exc.partial)} bytes") from None
    lines = head[:-4].split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError(f"not an HTTP/1.1 status line from Firecracker: {lines[0][:100]!r}")
    status = int(match.group(1))
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise ProtocolError(f"malformed header from Firecracker: {line[:100]!r}")
        name, value = name.strip().lower(), value.strip()
        if name in headers and headers[name] != value:
            raise ProtocolError(f"conflicting {name.decode(errors='replace')} headers from Firecracker")
        headers[name] = value
    if b"transfer-encoding" in headers:
        # Firecracker's micro_http always sends Content-Length; chunking is not it.
        raise ProtocolError("Firecracker sent a Transfer-Encoding this client does not accept")
    if status in (204, 304) or 100 <= status < 200:
        return status, b""
    length_text = headers.get(b"content-length", b"0")
    if not length_text.isdigit() or len(length_text) > 12:
        raise ProtocolError(f"bad Content-Length from Firecracker: {length_text[:40]!r}")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise ProtocolError(f"Firecracker's response body ({length} bytes) exceeds {MAX_BODY_BYTES}")
    try:
        return status, await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"Firecracker's response body ended after {len(exc.partial)} "
                            f"of {length} bytes") from None


async def save_snapshot(api_sock: Path | str, state_path: Path | str, mem_path: Path | str,
                        *, timeout: float = SNAPSHOT_TIMEOUT_S) -> None:
    """Pause a running VM and write a Full snapshot of it to ``state_path`` and ``mem_path``.

    The VM stays paused afterwards (the caller kills it: a template is not
    reused). Raises :class:`FirecrackerAPIError` when Firecracker refuses
    either step; the files may then be partial and must be discarded.
    """
    await api_request(api_sock, "PATCH", "/vm", pause_vm_body())
    await api_request(api_sock, "PUT", "/snapshot/create",
                      snapshot_create_body(state_path, mem_path), timeout=timeout)


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
