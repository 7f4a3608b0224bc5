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

    {"op": "admit", "vcpus": 2, "mem_mib": 512, "disk_mib": 2048, "profile": "base",
     "network": "none", "kernel_id": "…"}                         -> {"ok": true, "grant": 3}
                                                                   or {"ok": false, "why": "…"}
    {"op": "release", "grant": 3}                                 -> {"ok": true}
    {"op": "event", "event": "push", "fields": {...}}             -> (no answer)
    {"op": "ls"}                      -> {"ok": true, "grants": [...]} (root: all; others: their own)
    {"op": "join", "grant": 3}        -> {"ok": true}   (from the VMM's process, before it execs)
    {"op": "ram", "key": "<64 hex>"}  -> {"ok": true, "size": N} + a sealed memfd (SCM_RIGHTS)
                                         (a grant holder only; the key's snapshot must be in the
                                         root-owned seed folder: sharedram.py)

The VMM's cgroup: with a grant comes a cgroup the service made (memory, CPU
and pids limits from the granted shape, root-owned: the student cannot raise
them). A kernel that runs as a student cannot move a process into a cgroup
it does not own (cgroup v2 also wants write access to the common ancestor),
so the VMM's own process, between fork and exec, asks the service to move it:
the service sees that process's pid and uid in its credentials and moves it
only if it is the child of the process that holds the grant.

The shape is checked from the policy the service read, not taken from the
caller, and every grant's cgroup sits in one folder with the host-wide caps
on it: grants.py (the quota and budget arithmetic, a grant's record, the
caps). Who asks is the kernel's word, never the caller's, and what a caller
may send is checked and rate-limited: callers.py. This module is the server
around them: connections, requests, the grants' cgroups, the audit entries.

Joining (the VMM's process moving into the grant's cgroup) is checked by
pidfd and start time, not pid alone: the service takes a pidfd of every
connecting process (SO_PEERPIDFD, else pidfd_open) and its start time; a
joiner must be of the grant's uid, a child of the holder, the holder must be
the same process as at admit (start time), and after the write the joiner's
pidfd must still be alive with the same start time (else it is moved back:
the pid was reused). One VMM at a time: a second join is refused while the
first joiner lives (a paused VM's resume starts a new VMM under the same grant).

It survives its callers: at most MAX_CONNECTIONS_PER_UID connections per
non-root uid, a connection that holds no grant is closed after IDLE_TIMEOUT_S
without a request, its own RLIMIT_NOFILE soft limit is raised to the hard one,
and each non-root uid's events and admissions are rate-limited (token buckets).

The audit log: users' events must be of USER_EVENTS, carry only USER_FIELDS
(values size-capped; callers.py), and are written with ``"by": "user"``; the
service's own entries (admit, release, refused, events_dropped) say
``"by": "hostd"``. Both go to the policy's audit_log (the host's timeline, as
before); the service's own entries also go to ``<audit_log>-hostd.jsonl``
(e.g. audit-hostd.jsonl), which no user's event ever reaches, so users cannot
rotate them away by writing events; what a user can make the service write
there (an admission, granted or refused) is rate-limited per uid (ADMIT_BURST,
ADMIT_RATE), and ``events_dropped`` comes at most once a minute per uid.

Policy keys it reads (policy.py): max_vcpus, max_mem_mib, max_disk_mib,
profiles, network, max_vms_per_user, max_mem_mib_per_user, host_max_vms,
host_max_guest_mem_mib, host_reserve_mib, audit_log.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from pathlib import Path

from smolvm_kernel.classroom.callers import (ADMIT_BURST, ADMIT_RATE, EVENT_BURST, EVENT_RATE, USER_EVENTS,
                                             Bucket, Peer, Proc, dup, peer_of, request_shape, user_fields)
from smolvm_kernel.classroom.grants import VMM_OVERHEAD_MIB, Admissions, Grant, host_limits
from smolvm_kernel.classroom.sharedram import SharedRAM
from smolvm_kernel.host import cgroups
from smolvm_kernel.host import policy as policy_mod
from smolvm_kernel.host.admission import _MAX_LINE, SOCKET_PATH, AdmissionRefused
from smolvm_kernel.host.audit import AuditLog

log = logging.getLogger("smolvm_kernel.classroom.hostd")

#: Connections one non-root uid may have open at once.
MAX_CONNECTIONS_PER_UID = 32
#: A connection holding no grant is closed after this long without a request.
IDLE_TIMEOUT_S = 30.0


class HostService:
    """The asyncio server: one connection per kernel, its grants die with it."""

    def __init__(self, path: str = SOCKET_PATH, pol: policy_mod.Policy | None = None,
                 audit: AuditLog | None = None, host_available_mib=None, make_cgroups: bool = True,
                 *, own_audit: AuditLog | None = None, host_cores: int | None = None,
                 host_total_mib: int | None = None, cgroup_parent: str = cgroups.HOSTD_PARENT,
                 max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
                 idle_timeout: float = IDLE_TIMEOUT_S, event_burst: float = EVENT_BURST,
                 event_rate: float = EVENT_RATE, admit_burst: float = ADMIT_BURST,
                 admit_rate: float = ADMIT_RATE, proc: Proc | None = None, seeds: Path | None = None) -> None:
        self.path = path
        #: Sealed memfds of the shared seed folder's snapshots' RAM (sharedram.py).
        self.shared_ram = SharedRAM(seeds)
        self._ram_lock = asyncio.Lock()
        #: Make each grant's VMM cgroup (root only; unit tests of the protocol switch it off).
        self.make_cgroups = make_cgroups
        self.cgroup_parent = cgroup_parent
        self.admissions = Admissions(pol, host_available_mib, host_cores, host_total_mib)
        pol_log = pol.audit_log if pol is not None and pol.audit_log else None
        #: The host's timeline: the service's entries and users' events (marked "by").
        self.audit = audit or AuditLog(pol_log or "/var/log/smolvm/audit.jsonl")
        #: The service's own entries alone: no user-sent byte ever lands here.
        self.own_audit = own_audit or AuditLog(own_log_path(self.audit.path))
        self.max_connections_per_uid = max_connections_per_uid
        self.idle_timeout = idle_timeout
        self._event_bucket = (event_burst, event_rate)
        self._admit_bucket = (admit_burst, admit_rate)
        self._buckets: dict[tuple[str, int], Bucket] = {}
        self._dropped: collections.Counter[int] = collections.Counter()
        self._dropped_noted: dict[int, float] = {}
        self.connections: collections.Counter[int] = collections.Counter()
        self.proc = proc or Proc()
        #: The host-wide caps of the folder every grant's cgroup is in, or why none.
        self.parent_note = ""
        self.nofile: tuple[int, int] = (0, 0)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.nofile = raise_nofile()
        if self.make_cgroups and os.geteuid() == 0:
            limits = host_limits(self.admissions.policy, self.admissions.cores, self.admissions.total_mib)
            where = cgroups.set_parent_limits(self.cgroup_parent, limits)
            self.parent_note = where if isinstance(where, str) else f"{where.describe()}: {limits.describe()}"
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
        self.shared_ram.close()

    def _own(self, event: str, **fields) -> None:
        """An entry of the service's own: in the host's timeline and in its own log."""
        self.audit.record(event, by="hostd", **fields)
        self.own_audit.record(event, by="hostd", **fields)

    def _take(self, kind: str, uid: int) -> bool:
        """A token from this uid's bucket of ``kind`` (root is not limited)."""
        if uid == 0:
            return True
        burst, rate = self._event_bucket if kind == "event" else self._admit_bucket
        bucket = self._buckets.get((kind, uid))
        if bucket is None:
            bucket = self._buckets[(kind, uid)] = Bucket(burst, rate)
        return bucket.take()

    def _drop(self, peer: Peer, flush: bool = False) -> None:
        """Count an event not written; say so in the service's own log at most once a minute per uid."""
        if not flush:
            self._dropped[peer.uid] += 1
        n = self._dropped[peer.uid]
        now = time.monotonic()
        if n and (flush or now - self._dropped_noted.get(peer.uid, -1e9) >= 60):
            self._dropped_noted[peer.uid] = now
            self._dropped[peer.uid] = 0
            self._own("events_dropped", user=peer.user, uid=peer.uid, count=n,
                      why="over the user's rate, or not an event or field users may write")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            peer = peer_of(sock, self.proc)
        except OSError:
            writer.close()
            return
        if peer.uid != 0 and self.connections[peer.uid] >= self.max_connections_per_uid:
            peer.close()
            why = (f"{peer.user} has {self.connections[peer.uid]} connections open to the host's admission "
                   f"service, the most it allows per user ({self.max_connections_per_uid}): close "
                   f"other notebooks' kernels, or ask the instructor")
            try:
                writer.write(json.dumps({"ok": False, "why": why}).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), 1.0)
            except (ConnectionError, OSError, asyncio.TimeoutError):
                pass
            writer.close()
            return
        self.connections[peer.uid] += 1
        held: set[int] = set()
        try:
            while True:
                try:
                    # A connection that holds no grant has idle_timeout to ask
                    # (the whole line); one that holds a grant is the kernel's, for the VM's life.
                    line = await asyncio.wait_for(reader.readline(), None if held else self.idle_timeout)
                except (ValueError, ConnectionError, asyncio.TimeoutError):  # too long, a reset, idle
                    break
                if not line:
                    break
                try:
                    reply = self._handle(peer, held, line)
                except Exception as exc:      # a bug here must not end the service
                    log.warning("hostd: a request failed: %s: %s", type(exc).__name__, exc)
                    reply = {"ok": False, "why": f"the service failed on it ({type(exc).__name__})"}
                if reply is not None and "_ram" in reply:
                    await writer.drain()
                    await self._send_ram(sock, reply["_ram"])
                elif reply is not None:
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await asyncio.wait_for(writer.drain(), max(self.idle_timeout, 5.0))
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        finally:
            self.connections[peer.uid] -= 1
            if self.connections[peer.uid] <= 0:
                del self.connections[peer.uid]
            if self._dropped[peer.uid]:
                self._drop(peer, flush=True)
            for gid in held:
                grant = self._release(peer, gid, why="the kernel's connection closed")
                if grant is not None and grant.cgroup is not None:
                    await asyncio.to_thread(grant.cgroup.remove)
            peer.close()
            writer.close()

    def _handle(self, peer: Peer, held: set[int], line: bytes) -> dict | None:
        uid, user = peer.uid, peer.user
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "why": "not JSON"}
        if not isinstance(req, dict):
            return {"ok": False, "why": "not a JSON object"}
        op = req.get("op")
        if op in ("admit", "check"):
            asked = request_shape(op, req)
            if isinstance(asked, str):
                return {"ok": False, "why": asked}
            vcpus, mem, shape = asked
        if op == "admit":
            kernel_id = str(req.get("kernel_id", ""))[:200]
            if not self._take("admit", uid):
                return {"ok": False, "why": f"{user} asked to start microVMs too often: wait a minute"}
            what = f"a microVM of {vcpus} vCPUs and {mem} MiB"
            try:
                grant = self.admissions.admit(uid, user, vcpus, mem, kernel_id, **shape)
            except AdmissionRefused as exc:
                self._own("refused", user=user, uid=uid, kernel_id=kernel_id, what=what, why=str(exc))
                return {"ok": False, "why": str(exc)}
            # The holder, as it is now: its start time, to tell it from a later process with its pid.
            st = self.proc.stat(peer.pid)
            if peer.start is None or st is None or st[1] != peer.start or not self.proc.alive(peer.pidfd):
                self.admissions.release(grant.id)
                return {"ok": False, "why": "the service cannot tell which process asks (it has exited?)"}
            held.add(grant.id)
            grant.holder_pid, grant.holder_start = peer.pid, st[1]
            grant.holder_pidfd = dup(peer.pidfd)
            cgroup = self._make_cgroup(grant)
            self._own("admit", user=user, uid=uid, grant=grant.id, kernel_id=kernel_id,
                      vcpus=vcpus, mem_mib=mem, **shape, cgroup=cgroup.get("limits", cgroup.get("none")))
            return {"ok": True, "grant": grant.id, **cgroup}
        if op == "join":
            return self._join(peer, req.get("grant"))
        if op == "check":
            try:
                self.admissions.check(uid, user, vcpus, mem, **shape)
            except AdmissionRefused as exc:
                return {"ok": False, "why": str(exc)}
            return {"ok": True}
        if op == "release":
            gid = req.get("grant")
            if gid in held:
                held.discard(gid)
                grant = self._release(peer, gid)
                if grant is not None and grant.cgroup is not None:
                    grant.cgroup.remove(wait=0)
            return {"ok": True}
        if op == "event":
            self._event(peer, held, req)
            return None
        if op == "ram":
            if not held:
                return {"ok": False, "why": "the snapshot's RAM is given to a kernel holding a grant only"}
            return {"_ram": req.get("key")}
        if op == "ls":
            grants = [g.listed() for g in self.admissions.grants.values() if uid == 0 or g.uid == uid]
            return {"ok": True, "grants": grants}
        return {"ok": False, "why": f"unknown op {str(op)[:40]!r}"}

    async def _send_ram(self, sock, key) -> None:
        """The reply to ``ram`` with the snapshot's sealed memfd, or a refusal."""
        import socket

        async with self._ram_lock:
            try:
                await asyncio.to_thread(self.shared_ram.prune)
                fd = await asyncio.to_thread(self.shared_ram.get, key)
                # A copy of its own: another request may close the service's one meanwhile.
                fd = os.dup(fd) if fd is not None else None
            except OSError as exc:
                log.warning("hostd: cannot share the RAM of snapshot %.16s: %s", key, exc)
                fd = None
        if fd is None:
            reply, fds = {"ok": False, "why": "no such ready snapshot in the shared cache"}, []
        else:
            reply, fds = {"ok": True, "size": os.fstat(fd).st_size}, [fd]
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            raw.settimeout(1)
            socket.send_fds(raw, [json.dumps(reply).encode() + b"\n"], fds)
        finally:
            raw.close()
            for f in fds:
                os.close(f)

    def _release(self, peer: Peer, gid: int, **why) -> Grant | None:
        """Give grant ``gid`` back (its cgroup is the caller's to remove); the grant, or None."""
        grant = self.admissions.grants.get(gid)
        if grant is None:
            return None
        # On record before the place is free: whoever sees it free sees the entry.
        self._own("release", user=peer.user, uid=peer.uid, grant=gid, kernel_id=grant.kernel_id, **why)
        self.admissions.release(gid)
        grant.close_fds()
        return grant

    def _event(self, peer: Peer, held: set[int], req: dict) -> None:
        """A user's audit event: an allowed name, allowed fields, within the
        user's rate, marked as the user's; else counted as dropped."""
        event, fields = req.get("event"), req.get("fields")
        if not isinstance(event, str) or event not in USER_EVENTS or not self._take("event", peer.uid):
            self._drop(peer)
            return
        clean = user_fields(fields)
        self._note_state(held, event, clean)
        # Who wrote it is the service's to say, after the user's fields: it cannot be overridden.
        self.audit.record(event, **clean, by="user", user=peer.user, uid=peer.uid)

    def _make_cgroup(self, grant: Grant) -> dict:
        """The grant's VMM cgroup, described for the kernel (its folders, to read
        its OOM count; its limits), or why there is none."""
        if not self.make_cgroups:
            return {"none": "this service makes no cgroups"}
        if os.geteuid() != 0:
            return {"none": "the admission service does not run as root"}
        limits = cgroups.Limits.for_shape(grant.mem_mib, grant.vcpus, VMM_OVERHEAD_MIB)
        group = cgroups.create(f"hostd-{grant.id}-{os.getpid()}", limits, self.cgroup_parent)
        if isinstance(group, str):
            return {"none": group}
        grant.cgroup = group
        return {"cgroup_dirs": [str(d) for d in group.dirs], "cgroup_version": group.version,
                "limits": limits.describe(), "memory_bytes": limits.memory_bytes,
                "cpu_quota_us": limits.cpu_quota_us, "cpu_period_us": limits.cpu_period_us, "pids": limits.pids}

    def _join(self, peer: Peer, grant_id) -> dict:
        """Move the asking process into the grant's cgroup if it is the grant's VMM:
        of the grant's uid, a child of the holder (the same process as at admit),
        and still itself after the move (its pidfd lives, same start time)."""
        grant = self.admissions.grants.get(grant_id) if isinstance(grant_id, int) else None
        if grant is None or grant.uid != peer.uid or grant.cgroup is None:
            return {"ok": False, "why": "no such grant with a cgroup for this user"}
        pid, proc = peer.pid, self.proc
        now = proc.stat(pid)
        if peer.start is None or now is None or now[1] != peer.start or not proc.alive(peer.pidfd):
            return {"ok": False, "why": "the asking process is not the one that connected (it has exited)"}
        if now[0] != grant.holder_pid:
            return {"ok": False, "why": "only a child of the process holding the grant may join its cgroup"}
        holder = proc.stat(grant.holder_pid)
        if holder is None or holder[1] != grant.holder_start or not proc.alive(grant.holder_pidfd):
            return {"ok": False, "why": "the process that holds the grant has exited (its pid is another "
                                        "process's now): only its own child may join"}
        if grant.joined_pidfd is not None and proc.alive(grant.joined_pidfd):
            return {"ok": False, "why": f"the grant's VMM (pid {grant.joined_pid}) is in its cgroup already: "
                                        f"one VMM per grant"}
        dirs = list(grant.cgroup.dirs)
        origin = cgroups.folders_of(pid, dirs)
        try:
            for d in dirs:
                (d / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            self._move_back(pid, origin)
            return {"ok": False, "why": f"moving the VMM into its cgroup failed: {exc}"}
        after = proc.stat(pid)
        if not proc.alive(peer.pidfd) or after is None or after[1] != peer.start:
            # It exited while it was moved: the pid written may be another process's now.
            self._move_back(pid, origin)
            return {"ok": False, "why": "the asking process exited while it was being moved: refused"}
        if grant.joined_pidfd is not None:
            os.close(grant.joined_pidfd)
        grant.joined_pid, grant.joined_pidfd = pid, dup(peer.pidfd)
        return {"ok": True}

    @staticmethod
    def _move_back(pid: int, origin: list[Path] | None) -> None:
        for d in origin or ():
            try:
                (d / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass

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


def own_log_path(path: Path) -> Path:
    """The service's own log beside the host's: audit.jsonl -> audit-hostd.jsonl."""
    path = Path(path)
    return path.with_name(f"{path.stem}-hostd{path.suffix or '.jsonl'}")


def raise_nofile() -> tuple[int, int]:
    """RLIMIT_NOFILE's soft limit up to its hard limit (the service holds a
    socket and a pidfd per connection); the limits after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if hard == resource.RLIM_INFINITY:
        try:
            want = int(open("/proc/sys/fs/nr_open").read())
        except (OSError, ValueError):
            want = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            log.warning("hostd: cannot raise its open-file limit to %s: %s", want, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def serve(path: str = SOCKET_PATH) -> int:
    """Run the service until interrupted (``smolvm-kernel hostd``)."""
    from smolvm_kernel import paths

    pol = policy_mod.load()
    service = HostService(path, pol, seeds=paths.cache_dir() / "snapshots")

    async def run() -> None:
        await service.start()
        print(f"smolvm hostd: admitting microVMs on {path} under "
              f"{pol.whose if pol else 'no policy (every VM within the host is admitted)'}; "
              f"VMM cgroups: {service.parent_note or 'none'}; open files: {service.nofile[0]}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0
