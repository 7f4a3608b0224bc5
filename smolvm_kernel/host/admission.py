"""A kernel's side of the host's admission service (hostd): its VM's grant and cgroup.

Before it starts a VM, a Sandbox under a policy that names ``hostd`` asks the
root service (classroom/hostd.py) for a grant of the VM's shape over a Unix
socket and keeps the connection open while the VM lives: closing it gives the
grant back. With the grant may come a cgroup hostd made for the VMM, which the
VMM's process joins between fork and exec (:class:`DelegatedGroup`). Wire
format: one JSON object per line each way (hostd.py's docstring).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.host import cgroups

log = logging.getLogger("smolvm_kernel.host.admission")

SOCKET_PATH = "/run/smolvm/hostd.sock"
#: The longest line either side sends.
_MAX_LINE = 64 * 1024


class AdmissionRefused(SmolVMError):
    """The host's admission service said no; the message says who is over what."""


class HostClient:
    """A Sandbox's connection to hostd: holds its VM's grant while it is open."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise SmolVMError(f"the host's admission service ({path}) is not answering ({exc}); the "
                              f"instructor's policy needs it to start a microVM: ask the instructor "
                              f"to start it (smolvm-kernel hostd)") from None
        self._file = self.sock.makefile("rb")
        self.grant: int | None = None
        #: The VMM cgroup that came with the grant (hostd made it), or why none.
        self.cgroup: DelegatedGroup | None = None
        self.cgroup_note = ""

    def _ask(self, req: dict) -> dict:
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        line = self._file.readline(_MAX_LINE)
        if not line:
            raise SmolVMError(f"the host's admission service ({self.path}) closed the connection")
        return json.loads(line)

    def admit(self, vcpus: int, mem_mib: int, kernel_id: str = "", disk_mib: int | None = None,
              profile: str | None = None, network: str | None = None) -> int:
        """A grant for a VM of this shape (disk_mib, profile and network: the service
        refuses a request without one its policy caps), or AdmissionRefused."""
        reply = self._ask({"op": "admit", "vcpus": vcpus, "mem_mib": mem_mib, "kernel_id": kernel_id,
                           **_present(disk_mib=disk_mib, profile=profile, network=network)})
        if not reply.get("ok"):
            raise AdmissionRefused(f"the host refused to start a microVM: {reply.get('why')}")
        self.grant = reply["grant"]
        if isinstance(reply.get("cgroup_dirs"), list):
            limits = cgroups.Limits(int(reply["memory_bytes"]), int(reply["cpu_quota_us"]),
                                    int(reply["cpu_period_us"]), int(reply["pids"]))
            self.cgroup = DelegatedGroup(f"grant-{self.grant}", [Path(d) for d in reply["cgroup_dirs"]],
                                         limits, int(reply["cgroup_version"]), self.path, self.grant)
        else:
            self.cgroup_note = str(reply.get("none", ""))
        return self.grant

    def check(self, vcpus: int, mem_mib: int, disk_mib: int | None = None, profile: str | None = None,
              network: str | None = None) -> str | None:
        """Why a VM of this shape would be refused now, or None (nothing is granted)."""
        reply = self._ask({"op": "check", "vcpus": vcpus, "mem_mib": mem_mib,
                           **_present(disk_mib=disk_mib, profile=profile, network=network)})
        return None if reply.get("ok") else str(reply.get("why"))

    def event(self, event: str, **fields) -> None:
        try:
            self.sock.sendall(json.dumps({"op": "event", "event": event, "fields": fields},
                                         default=str).encode() + b"\n")
        except OSError as exc:
            log.warning("cannot send an audit event to hostd: %s", exc)

    def shared_ram(self, key: str) -> int | None:
        """hostd's sealed memfd of the shared ready snapshot ``key``'s guest RAM
        (classroom/sharedram.py), a descriptor of this process's own (not
        inherited), or None: no such snapshot, or a service that does not offer it."""
        import fcntl

        try:
            self.sock.sendall(json.dumps({"op": "ram", "key": key}).encode() + b"\n")
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _MAX_LINE, 4)
            while data and not data.endswith(b"\n"):
                more = self.sock.recv(_MAX_LINE)
                if not more:
                    break
                data += more
        except OSError as exc:
            log.warning("cannot ask hostd for the snapshot's RAM: %s", exc)
            return None
        for fd in fds:
            os.set_inheritable(fd, False)
        try:
            reply = json.loads(data or b"{}")
        except ValueError:
            reply = {}
        fd = fds[0] if reply.get("ok") and len(fds) == 1 else None
        for other in fds:
            if other != fd:
                os.close(other)
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
        try:
            if fd is not None and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & seals != seals:
                raise OSError("the memory file is not sealed against writes")
        except OSError as exc:
            log.warning("hostd's snapshot RAM refused: %s", exc)
            os.close(fd)
            return None
        return fd

    def list(self) -> list[dict]:
        return self._ask({"op": "ls"}).get("grants", [])

    def close(self) -> None:
        """Give the grant back (closing is enough: the service releases what a connection held)."""
        try:
            self._file.close()
            self.sock.close()
        except OSError:
            pass


def _present(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


class DelegatedGroup(cgroups.VMGroup):
    """A VMM cgroup made by hostd: the VMM's process asks the service to move it
    in (join, between fork and exec); hostd removes it with the grant."""

    def __init__(self, vm_id, dirs, limits, version, socket_path: str, grant: int) -> None:
        super().__init__(vm_id, dirs, limits, version)
        self.socket_path, self.grant = socket_path, grant

    def join(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(10)
            sock.connect(self.socket_path)
            sock.sendall(json.dumps({"op": "join", "grant": self.grant}).encode() + b"\n")
            reply = json.loads(sock.makefile("rb").readline(_MAX_LINE) or b"{}")
        finally:
            sock.close()
        if not reply.get("ok"):
            raise OSError(f"hostd did not move the VMM into its cgroup: {reply.get('why')}")

    def remove(self, wait: float = 2.0) -> bool:
        return True       # the service's: it goes with the grant


def admission_answer(cfg) -> str:
    """Whether this host would start a VM of ``cfg``'s shape (a validated
    SandboxConfig: what a kernel here gets), now: "ok", "ok (no budget)" or
    "refused: <why>" (doctor --json, admission)."""
    pol = cfg.policy
    if pol is None or not pol.hostd:
        return "ok (no budget)"
    client = HostClient(pol.hostd)
    try:
        why = client.check(cfg.vcpus, cfg.mem_mib, cfg.disk_mib, cfg.profile, cfg.network)
    finally:
        client.close()
    return "ok" if why is None else f"refused: {why}"
