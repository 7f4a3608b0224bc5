"""hostd: the host's admission service for VMs: per-user quotas, a host budget, the audit log.

One root-owned process per classroom host (``smolvm-kernel hostd``) on a Unix
socket. Before it starts a VM, a kernel (its Sandbox) asks for a grant with
the VM's shape; the service knows the caller by the socket's peer
credentials (SO_PEERCRED: the uid the kernel runs as, not a claim), checks
that user's quota and the host's budget from the instructor's policy, and
answers with a grant or a refusal that says who is over what. A grant lasts
as long as the caller keeps its connection open: a kernel that stops, exits
or is killed gives it back with no one's help. Audit events come over the
same connection and are written with the uid the service saw.

Wire format: one JSON object per line each way; requests carry ``op``:

    {"op": "admit", "vcpus": 2, "mem_mib": 512, "kernel_id": "…"} -> {"ok": true, "grant": 3}
                                                                   or {"ok": false, "why": "…"}
    {"op": "release", "grant": 3}                                 -> {"ok": true}
    {"op": "event", "event": "push", "fields": {...}}             -> (no answer)
    {"op": "ls"}                      -> {"ok": true, "grants": [...]} (root: all; others: their own)
    {"op": "join", "grant": 3}        -> {"ok": true}   (from the VMM's process, before it execs)

The VMM's cgroup: with a grant comes a cgroup the service made (memory, CPU
and pids limits from the granted shape, root-owned: the student cannot raise
them). A kernel that runs as a student cannot move a process into a cgroup
it does not own (cgroup v2 also wants write access to the common ancestor),
so the VMM's own process, between fork and exec, asks the service to move it:
the service sees that process's pid and uid in its credentials and moves it
only if it is the child of the process that holds the grant.

Policy keys it reads (policy.py): max_vms_per_user, max_mem_mib_per_user,
host_max_vms, host_max_guest_mem_mib, host_reserve_mib.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import pwd
import socket
import struct
import time
from pathlib import Path

from smolvm_kernel import cgroups
from smolvm_kernel import policy as policy_mod
from smolvm_kernel.audit import AuditLog
from smolvm_kernel.errors import SmolVMError

log = logging.getLogger("smolvm_kernel.hostd")

SOCKET_PATH = "/run/smolvm/hostd.sock"
_MAX_LINE = 64 * 1024
#: Fields of an audit entry that the service writes itself, whatever a caller sends.
_OWN_FIELDS = frozenset({"ts", "host", "user", "uid", "pid", "event"})


class AdmissionRefused(SmolVMError):
    """The host's admission service said no; the message says who is over what."""


@dataclasses.dataclass
class Grant:
    id: int
    uid: int
    user: str
    vcpus: int
    mem_mib: int
    kernel_id: str
    since: float
    #: The process holding the grant's connection (the kernel), and the VMM's
    #: cgroup the service made for it (None: the host has no usable hierarchy).
    holder_pid: int = 0
    cgroup: object = dataclasses.field(default=None, repr=False, compare=False)
    #: What the holder's audit events said: its VM, and whether it is paused to disk.
    vm_id: str = ""
    state: str = "starting"


class Admissions:
    """The quota and budget arithmetic, apart from sockets (unit-tested)."""

    def __init__(self, pol: policy_mod.Policy | None, host_available_mib=None) -> None:
        self.policy = pol
        self.grants: dict[int, Grant] = {}
        self._ids = itertools.count(1)
        self._available = host_available_mib or _mem_available_mib

    def admit(self, uid: int, user: str, vcpus: int, mem_mib: int, kernel_id: str = "") -> Grant:
        """A grant, or AdmissionRefused naming the limit, the figures and what to do."""
        p = self.policy
        mine = [g for g in self.grants.values() if g.uid == uid]
        if p is not None:
            if p.max_vms_per_user is not None and len(mine) + 1 > p.max_vms_per_user:
                raise AdmissionRefused(
                    f"{user} has {len(mine)} microVM{'s' if len(mine) != 1 else ''} running, the most "
                    f"{p.whose} allows per user ({p.max_vms_per_user}): close another notebook's kernel "
                    f"(or shut it down), or ask the instructor")
            used = sum(g.mem_mib for g in mine)
            if p.max_mem_mib_per_user is not None and used + mem_mib > p.max_mem_mib_per_user:
                raise AdmissionRefused(
                    f"{user}'s microVMs have {used} MiB and this one asks for {mem_mib} MiB, over the "
                    f"{p.max_mem_mib_per_user} MiB {p.whose} allows per user: close another notebook's "
                    f"kernel, ask for less memory, or ask the instructor")
            if p.host_max_vms is not None and len(self.grants) + 1 > p.host_max_vms:
                raise AdmissionRefused(
                    f"this host runs {len(self.grants)} microVMs, its budget ({p.whose}): try again "
                    f"when others have finished, or ask the instructor")
            total = sum(g.mem_mib for g in self.grants.values())
            if p.host_max_guest_mem_mib is not None and total + mem_mib > p.host_max_guest_mem_mib:
                raise AdmissionRefused(
                    f"this host's microVMs have {total} MiB of its {p.host_max_guest_mem_mib} MiB budget "
                    f"({p.whose}) and this one asks for {mem_mib} MiB: try again later, ask for less "
                    f"memory, or ask the instructor")
            if p.host_reserve_mib is not None:
                free = self._available()
                if free - mem_mib < p.host_reserve_mib:
                    raise AdmissionRefused(
                        f"the host has {free} MiB free and keeps {p.host_reserve_mib} MiB for itself "
                        f"({p.whose}); a {mem_mib} MiB microVM does not fit now: try again later, "
                        f"or ask the instructor")
        grant = Grant(next(self._ids), uid, user, vcpus, mem_mib, kernel_id, time.time())
        self.grants[grant.id] = grant
        return grant

    def check(self, uid: int, user: str, vcpus: int, mem_mib: int) -> None:
        """AdmissionRefused if a VM of this shape would be refused now; grants nothing."""
        grant = self.admit(uid, user, vcpus, mem_mib)
        self.grants.pop(grant.id, None)

    def release(self, grant_id: int) -> Grant | None:
        return self.grants.pop(grant_id, None)


def _mem_available_mib() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def peer_creds(sock: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and uid, from the kernel (not from anything it sent)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def peer_uid(sock: socket.socket) -> int:
    return peer_creds(sock)[1]


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


#: Host memory a VMM may use beyond its guest's RAM, in its cgroup (as
#: SandboxConfig.vmm_overhead_mib's default; the student's own value is not used).
VMM_OVERHEAD_MIB = 256


class HostService:
    """The asyncio server: one connection per kernel, its grants die with it."""

    def __init__(self, path: str = SOCKET_PATH, pol: policy_mod.Policy | None = None,
                 audit: AuditLog | None = None, host_available_mib=None, make_cgroups: bool = True) -> None:
        self.path = path
        #: Make each grant's VMM cgroup (root only; unit tests of the protocol switch it off).
        self.make_cgroups = make_cgroups
        self.admissions = Admissions(pol, host_available_mib)
        pol_log = pol.audit_log if pol is not None and pol.audit_log else None
        self.audit = audit or AuditLog(pol_log or "/var/log/smolvm/audit.jsonl")
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=_MAX_LINE)
        os.chmod(self.path, 0o666)       # anyone may ask; SO_PEERCRED says who asks

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid = peer_creds(writer.get_extra_info("socket"))
        user = _user_name(uid)
        held: set[int] = set()
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, ConnectionError):      # a line over the limit, a reset
                    break
                if not line:
                    break
                try:
                    reply = self._handle(uid, user, held, line, pid)
                except Exception as exc:      # a bug here must not end the service
                    log.warning("hostd: a request failed: %s: %s", type(exc).__name__, exc)
                    reply = {"ok": False, "why": f"the service failed on it ({type(exc).__name__})"}
                if reply is not None:
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for gid in held:
                grant = self.admissions.grants.get(gid)
                if grant is not None:
                    # On record before the place is free: whoever sees it free sees the entry.
                    self.audit.record("release", user=user, uid=uid, grant=gid, kernel_id=grant.kernel_id,
                                      why="the kernel's connection closed")
                    self.admissions.release(gid)
                    if grant.cgroup is not None:
                        await asyncio.to_thread(grant.cgroup.remove)
            writer.close()

    def _handle(self, uid: int, user: str, held: set[int], line: bytes, pid: int = 0) -> dict | None:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "why": "not JSON"}
        if not isinstance(req, dict):
            return {"ok": False, "why": "not a JSON object"}
        op = req.get("op")
        if op in ("admit", "check"):
            vcpus, mem = req.get("vcpus"), req.get("mem_mib")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (vcpus, mem)):
                return {"ok": False, "why": f"{op} needs vcpus and mem_mib as positive whole numbers"}
        if op == "admit":
            kernel_id = str(req.get("kernel_id", ""))[:200]
            try:
                grant = self.admissions.admit(uid, user, vcpus, mem, kernel_id)
            except AdmissionRefused as exc:
                self.audit.record("refused", user=user, uid=uid, kernel_id=kernel_id,
                                  what=f"a microVM of {vcpus} vCPUs and {mem} MiB", why=str(exc))
                return {"ok": False, "why": str(exc)}
            held.add(grant.id)
            grant.holder_pid = pid
            cgroup = self._make_cgroup(grant)
            self.audit.record("admit", user=user, uid=uid, grant=grant.id, kernel_id=kernel_id,
                              vcpus=vcpus, mem_mib=mem, cgroup=cgroup.get("limits", cgroup.get("none")))
            return {"ok": True, "grant": grant.id, **cgroup}
        if op == "join":
            return self._join(uid, pid, req.get("grant"))
        if op == "check":
            try:
                self.admissions.check(uid, user, vcpus, mem)
            except AdmissionRefused as exc:
                return {"ok": False, "why": str(exc)}
            return {"ok": True}
        if op == "release":
            gid = req.get("grant")
            if gid in held:
                held.discard(gid)
                self.audit.record("release", user=user, uid=uid, grant=gid)
                self.admissions.release(gid)
            return {"ok": True}
        if op == "event":
            fields = req.get("fields") if isinstance(req.get("fields"), dict) else {}
            event = str(req.get("event", "event"))[:40]
            self._note_state(held, event, fields)
            # The service's own idea of who this is goes last: it cannot be overridden.
            self.audit.record(event, **{k: v for k, v in fields.items()
                                        if isinstance(k, str) and k not in _OWN_FIELDS
                                        and isinstance(v, (str, int, float, bool))},
                              user=user, uid=uid)
            return None
        if op == "ls":
            grants = [{f.name: getattr(g, f.name) for f in dataclasses.fields(g) if f.name != "cgroup"}
                      for g in self.admissions.grants.values() if uid == 0 or g.uid == uid]
            return {"ok": True, "grants": grants}
        return {"ok": False, "why": f"unknown op {str(op)[:40]!r}"}


    def _make_cgroup(self, grant: Grant) -> dict:
        """The grant's VMM cgroup, described for the kernel (its folders, to read
        its OOM count; its limits), or why there is none."""
        if not self.make_cgroups:
            return {"none": "this service makes no cgroups"}
        if os.geteuid() != 0:
            return {"none": "the admission service does not run as root"}
        limits = cgroups.Limits.for_shape(grant.mem_mib, grant.vcpus, VMM_OVERHEAD_MIB)
        group = cgroups.create(f"hostd-{grant.id}-{os.getpid()}", limits)
        if isinstance(group, str):
            return {"none": group}
        grant.cgroup = group
        return {"cgroup_dirs": [str(d) for d in group.dirs], "cgroup_version": group.version,
                "limits": limits.describe(), "memory_bytes": limits.memory_bytes,
                "cpu_quota_us": limits.cpu_quota_us, "cpu_period_us": limits.cpu_period_us, "pids": limits.pids}

    def _join(self, uid: int, pid: int, grant_id) -> dict:
        grant = self.admissions.grants.get(grant_id) if isinstance(grant_id, int) else None
        if grant is None or grant.uid != uid or grant.cgroup is None:
            return {"ok": False, "why": "no such grant with a cgroup for this user"}
        if _parent_pid(pid) != grant.holder_pid:
            return {"ok": False, "why": "only a child of the process holding the grant may join its cgroup"}
        try:
            for d in grant.cgroup.dirs:
                (d / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            return {"ok": False, "why": f"moving the VMM into its cgroup failed: {exc}"}
        return {"ok": True}

    def _note_state(self, held: set[int], event: str, fields: dict) -> None:
        """The state `ls --all` shows, from this connection's own events (a
        connection holds one VM's grant)."""
        states = {"start": "running", "pause": "paused", "resume": "running"}
        for gid in held:
            grant = self.admissions.grants.get(gid)
            if grant is not None and event in states:
                grant.state = states[event]
                if isinstance(fields.get("vm_id"), str):
                    grant.vm_id = fields["vm_id"][:40]


class HostClient:
    """A Sandbox's connection to hostd: holds its VM's grant while it is open."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except OSError as exc:
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

    def admit(self, vcpus: int, mem_mib: int, kernel_id: str = "") -> int:
        reply = self._ask({"op": "admit", "vcpus": vcpus, "mem_mib": mem_mib, "kernel_id": kernel_id})
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

    def check(self, vcpus: int, mem_mib: int) -> str | None:
        """Why a VM of this shape would be refused now, or None (nothing is granted)."""
        reply = self._ask({"op": "check", "vcpus": vcpus, "mem_mib": mem_mib})
        return None if reply.get("ok") else str(reply.get("why"))

    def event(self, event: str, **fields) -> None:
        try:
            self.sock.sendall(json.dumps({"op": "event", "event": event, "fields": fields},
                                         default=str).encode() + b"\n")
        except OSError as exc:
            log.warning("cannot send an audit event to hostd: %s", exc)

    def list(self) -> list[dict]:
        return self._ask({"op": "ls"}).get("grants", [])

    def close(self) -> None:
        """Give the grant back (closing is enough: the service releases what a connection held)."""
        try:
            self._file.close()
            self.sock.close()
        except OSError:
            pass


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


def admission_answer() -> str:
    """Whether this host would start a VM of the shape a kernel here gets, now:
    "ok", "ok (no budget)" or "refused: <why>" (doctor --json, admission)."""
    from smolvm_kernel.config import SandboxConfig

    cfg = SandboxConfig().validated()
    pol = cfg.policy
    if pol is None or not pol.hostd:
        return "ok (no budget)"
    client = HostClient(pol.hostd)
    try:
        why = client.check(cfg.vcpus, cfg.mem_mib)
    finally:
        client.close()
    return "ok" if why is None else f"refused: {why}"


def serve(path: str = SOCKET_PATH) -> int:
    """Run the service until interrupted (``smolvm-kernel hostd``)."""
    pol = policy_mod.load()
    service = HostService(path, pol)

    async def run() -> None:
        await service.start()
        print(f"smolvm hostd: admitting microVMs on {path} under "
              f"{pol.whose if pol else 'no policy (every VM is admitted)'}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0
