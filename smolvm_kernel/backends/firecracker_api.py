"""Firecracker's REST API: the request bodies in boot order, and a bounded HTTP/1.1 client.

Firecracker is configured, not launched with arguments: :func:`boot_requests`
are sent over its API socket in Firecracker's boot order (machine config,
boot source, drives, vsock, entropy, ``InstanceStart``), or for a ready
snapshot :func:`restore_requests` (one PUT /snapshot/load). The bodies are
pure functions so the unit tests can check each one, without a Firecracker
binary, against ``firecracker_contract.json`` beside this module: the
endpoints and bodies this backend uses, written from Firecracker's published
API. :func:`api_request` sends one request and reads one answer, bounded:
the VMM is not trusted either.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from smolvm_kernel.backends.base import VMSpec
from smolvm_kernel.errors import ProtocolError, SmolVMError

VSOCK_UDS_NAME = "vsock.sock"
#: CIDs 0-2 are reserved (hypervisor, local, host); 3 is the first guest CID.
#: Each Firecracker has its own vsock device, so every VM can use 3.
GUEST_CID = 3

#: The VMM is not trusted either: a compromised Firecracker must not make the
#: host buffer without bound. Real API answers are a few hundred bytes.
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024

#: Firecracker answers every configuration call in milliseconds; ten seconds
#: only matters on a host so loaded that the boot would time out anyway.
API_TIMEOUT_S = 10.0
#: Creating a Full snapshot writes all guest memory to a file (hundreds of MB);
#: loading one maps files but may read the state file from a cold cache.
SNAPSHOT_TIMEOUT_S = 120.0
#: Name of the guest-memory file in a snapshot folder (beside Snapshot.state).
SNAPSHOT_MEMORY_NAME = "memory.bin"

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
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
