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

The VMM's cgroup: with a grant comes a cgroup the service made (memory, CPU
and pids limits from the granted shape, root-owned: the student cannot raise
them). A kernel that runs as a student cannot move a process into a cgroup
it does not own (cgroup v2 also wants write access to the common ancestor),
so the VMM's own process, between fork and exec, asks the service to move it:
the service sees that process's pid and uid in its credentials and moves it
only if it is the child of the process that holds the grant.

The shape is checked here, from the policy the service read, not taken from
the caller: vcpus <= max_vcpus and <= this host's cores, mem_mib <= max_mem_mib
and <= the host's memory, disk_mib <= max_disk_mib, profile in profiles,
network in network. A request that leaves out disk_mib, profile or network is
refused when the policy caps that key (an older client: update it). A refusal
names the key, the value asked and the policy file.

Every grant's cgroup sits in one folder (cgroups.HOSTD_PARENT: ``smolvm`` in
each hierarchy), on which the service puts the host-wide caps
(:func:`host_limits`): memory = the host's RAM less host_reserve_mib (less a
tenth, at most 2 GiB, without one), and at most host_max_guest_mem_mib plus
each VM's VMM overhead; CPU = the host's cores; pids = enough for
host_max_vms VMMs (64 without it).

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
(values size-capped), and are written with ``"by": "user"``; the service's own
entries (admit, release, refused, events_dropped) say ``"by": "hostd"``. Both
go to the policy's audit_log (the host's timeline, as before); the service's
own entries also go to ``<audit_log>-hostd.jsonl`` (e.g. audit-hostd.jsonl),
which no user's event ever reaches, so users cannot rotate them away by
writing events; what a user can make the service write there (an admission,
granted or refused) is rate-limited per uid (ADMIT_BURST, ADMIT_RATE), and
``events_dropped`` comes at most once a minute per uid.

Policy keys it reads (policy.py): max_vcpus, max_mem_mib, max_disk_mib,
profiles, network, max_vms_per_user, max_mem_mib_per_user, host_max_vms,
host_max_guest_mem_mib, host_reserve_mib, audit_log.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import logging
import math
import os
import pwd
import select
import socket
import struct
import time
from pathlib import Path

from smolvm_kernel.host import cgroups
from smolvm_kernel.host import policy as policy_mod
from smolvm_kernel.host import procs
from smolvm_kernel.host.admission import _MAX_LINE, SOCKET_PATH, AdmissionRefused
from smolvm_kernel.host.audit import AuditLog

log = logging.getLogger("smolvm_kernel.classroom.hostd")

#: The events users' kernels and servers may write (what sandbox.py, kernel.py,
#: pause.py and classroom.py send today). Never admit, release, join or
#: events_dropped: those are the service's own.
USER_EVENTS = frozenset({"start", "stop", "death", "reset", "push", "pull", "refused",
                         "pause", "resume", "culled"})
#: The fields those events may carry; any other is dropped (``by``, ``uid``,
#: ``user``, ``ts``, ``host``, ``pid`` are the service's).
USER_FIELDS = frozenset({"vm_id", "kernel_id", "profile", "vcpus", "mem_mib", "disk_mib", "network",
                         "transport", "backend", "accel", "boot_s", "started_from", "ran_s", "cause",
                         "path", "bytes", "idle_s", "state_bytes", "pause_s", "vmm_rss_kib", "paused_s",
                         "resume_s", "what", "why", "idle_timeout_s"})
#: A user's string value is cut to this many characters.
USER_VALUE_MAX = 1024
#: Connections one non-root uid may have open at once.
MAX_CONNECTIONS_PER_UID = 32
#: A connection holding no grant is closed after this long without a request.
IDLE_TIMEOUT_S = 30.0
#: Per non-root uid: events (burst, per second) and admissions (burst, per second).
EVENT_BURST, EVENT_RATE = 200, 5.0
ADMIT_BURST, ADMIT_RATE = 30, 0.2
#: Sane bounds with or without a policy: a disk of at most 1 TiB.
MAX_DISK_MIB = 1 << 20
#: Linux's SO_PEERPIDFD (6.5+): a pidfd of the very process that connected.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


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
    disk_mib: int | None = None
    profile: str | None = None
    network: str | None = None
    #: The holder's start time (field 22 of /proc/<pid>/stat) at admit, and a
    #: pidfd of it; the VMM that joined the cgroup (a pidfd, to tell it lives).
    holder_start: int | None = dataclasses.field(default=None, repr=False)
    holder_pidfd: int | None = dataclasses.field(default=None, repr=False, compare=False)
    joined_pid: int = 0
    joined_pidfd: int | None = dataclasses.field(default=None, repr=False, compare=False)

    #: What `ls` shows of a grant.
    LISTED = ("id", "uid", "user", "vcpus", "mem_mib", "disk_mib", "profile", "network", "kernel_id",
              "since", "holder_pid", "joined_pid", "vm_id", "state")

    def listed(self) -> dict:
        return {k: getattr(self, k) for k in self.LISTED}


class Admissions:
    """The quota and budget arithmetic, apart from sockets (unit-tested)."""

    def __init__(self, pol: policy_mod.Policy | None, host_available_mib=None,
                 host_cores: int | None = None, host_total_mib: int | None = None) -> None:
        self.policy = pol
        self.grants: dict[int, Grant] = {}
        self._ids = itertools.count(1)
        self._available = host_available_mib or _mem_available_mib
        self.cores = host_cores or _host_cores()
        self.total_mib = host_total_mib or _mem_total_mib()

    def shape_refusal(self, vcpus: int, mem_mib: int, disk_mib: int | None = None,
                      profile: str | None = None, network: str | None = None) -> str | None:
        """Why one VM of this shape is refused whatever else runs (the policy's
        per-VM caps, the host's size), or None."""
        p = self.policy
        if p is not None and p.max_vcpus is not None and vcpus > p.max_vcpus:
            return (f"vcpus={vcpus} is above the cap of {p.max_vcpus} vCPUs per microVM (max_vcpus) set by "
                    f"{p.whose}: ask for fewer, or ask the instructor")
        if vcpus > self.cores:
            return (f"vcpus={vcpus} is more than this host's {self.cores} CPU cores: ask for at most "
                    f"{self.cores}")
        if p is not None and p.max_mem_mib is not None and mem_mib > p.max_mem_mib:
            return (f"mem_mib={mem_mib} is above the cap of {p.max_mem_mib} MiB per microVM (max_mem_mib) "
                    f"set by {p.whose}: ask for less memory, or ask the instructor")
        if mem_mib > self.total_mib:
            return f"mem_mib={mem_mib} is more than this host's {self.total_mib} MiB of memory"
        cap = p.max_disk_mib if p is not None else None
        if disk_mib is None:
            if cap is not None:
                return (f"the request does not say its disk size (disk_mib) and {p.whose} caps it at "
                        f"{cap} MiB (max_disk_mib): update smolvm-kernel")
        elif cap is not None and disk_mib > cap:
            return (f"disk_mib={disk_mib} is above the cap of {cap} MiB per microVM (max_disk_mib) set by "
                    f"{p.whose}: ask for a smaller disk, or ask the instructor")
        elif disk_mib > MAX_DISK_MIB:
            return f"disk_mib={disk_mib} is above the {MAX_DISK_MIB} MiB this service allows any microVM"
        for key, value, allowed in (("profile", profile, p.profiles if p else None),
                                    ("network", network, p.network if p else None)):
            if allowed is None:
                continue
            names = ", ".join(repr(a) for a in allowed)
            setting = "profiles" if key == "profile" else "network"
            if value is None:
                return (f"the request does not say its {key} and {p.whose} allows only {names} "
                        f"({setting}): update smolvm-kernel")
            if value not in allowed:
                return (f"{key}={value!r} is not allowed by {p.whose}, which allows {names} ({setting}): "
                        f"ask the instructor to change it")
        return None

    def admit(self, uid: int, user: str, vcpus: int, mem_mib: int, kernel_id: str = "",
              disk_mib: int | None = None, profile: str | None = None, network: str | None = None) -> Grant:
        """A grant, or AdmissionRefused naming the limit, the figures and what to do."""
        why = self.shape_refusal(vcpus, mem_mib, disk_mib, profile, network)
        if why is not None:
            raise AdmissionRefused(why)
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
        grant = Grant(next(self._ids), uid, user, vcpus, mem_mib, kernel_id, time.time(),
                      disk_mib=disk_mib, profile=profile, network=network)
        self.grants[grant.id] = grant
        return grant

    def check(self, uid: int, user: str, vcpus: int, mem_mib: int, disk_mib: int | None = None,
              profile: str | None = None, network: str | None = None) -> None:
        """AdmissionRefused if a VM of this shape would be refused now; grants nothing."""
        grant = self.admit(uid, user, vcpus, mem_mib, "", disk_mib, profile, network)
        self.grants.pop(grant.id, None)

    def release(self, grant_id: int) -> Grant | None:
        return self.grants.pop(grant_id, None)


def _mem_available_mib() -> int:
    return procs.meminfo_mib("MemAvailable")


def _mem_total_mib() -> int:
    return procs.meminfo_mib("MemTotal")


def _host_cores() -> int:
    """The cores this service may run on (its affinity), else the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: Host memory a VMM may use beyond its guest's RAM, in its cgroup (as
#: SandboxConfig.vmm_overhead_mib's default; the student's own value is not used).
VMM_OVERHEAD_MIB = 256


def host_limits(pol: policy_mod.Policy | None, cores: int, total_mib: int) -> cgroups.Limits:
    """The caps of the folder all grants' cgroups are in: every VMM together."""
    reserve = pol.host_reserve_mib if pol is not None and pol.host_reserve_mib is not None \
        else min(2048, total_mib // 10)
    mem = total_mib - reserve
    vms = pol.host_max_vms if pol is not None and pol.host_max_vms else None
    if pol is not None and pol.host_max_guest_mem_mib is not None:
        mem = min(mem, pol.host_max_guest_mem_mib + VMM_OVERHEAD_MIB * (vms or max(1, cores)))
    per_vmm = cgroups.PIDS_BASE + 2 * cores
    return cgroups.Limits(memory_bytes=max(256, mem) * 2**20, cpu_quota_us=cores * cgroups.CPU_PERIOD_US,
                          cpu_period_us=cgroups.CPU_PERIOD_US, pids=(vms or 64) * per_vmm)


class Bucket:
    """A token bucket: ``burst`` at once, then ``rate`` a second."""

    def __init__(self, burst: float, rate: float, clock=time.monotonic) -> None:
        self.burst, self.rate, self.clock = burst, rate, clock
        self.tokens, self.at = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Proc:
    """What the service reads of a process (a class, so tests can fake /proc)."""

    def stat(self, pid: int) -> tuple[int, int] | None:
        """(parent pid, start time in clock ticks: fields 4 and 22 of /proc/<pid>/stat), or None."""
        return procs.parent_and_start(pid)

    def uid(self, pid: int) -> int | None:
        """The process's real uid, or None."""
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("Uid:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def alive(self, pidfd: int | None) -> bool:
        """Whether the process a pidfd refers to has not exited (a pidfd polls
        readable once it has)."""
        if pidfd is None:
            return False
        try:
            readable, _, _ = select.select([pidfd], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable


@dataclasses.dataclass
class Peer:
    """Who is on a connection: from the kernel (SO_PEERCRED, a pidfd), not from anything it sent."""

    pid: int
    uid: int
    user: str
    pidfd: int | None = None
    #: Its start time when it connected (None: hostd could not tell).
    start: int | None = None

    def close(self) -> None:
        if self.pidfd is not None:
            try:
                os.close(self.pidfd)
            except OSError:
                pass
            self.pidfd = None


def peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd of the process that connected: SO_PEERPIDFD names that very
    process; pidfd_open(pid) (older kernels) the process with its pid now."""
    try:
        fd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        if fd >= 0:
            os.set_inheritable(fd, False)
            return fd
    except (OSError, struct.error):
        pass
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


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


def _clean_value(v):
    """A user's field value as written, or None to drop it."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v if -2**63 <= v < 2**63 else None
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        return v if len(v) <= USER_VALUE_MAX else v[:USER_VALUE_MAX] + "…"
    return None


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


class HostService:
    """The asyncio server: one connection per kernel, its grants die with it."""

    def __init__(self, path: str = SOCKET_PATH, pol: policy_mod.Policy | None = None,
                 audit: AuditLog | None = None, host_available_mib=None, make_cgroups: bool = True,
                 *, own_audit: AuditLog | None = None, host_cores: int | None = None,
                 host_total_mib: int | None = None, cgroup_parent: str = cgroups.HOSTD_PARENT,
                 max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
                 idle_timeout: float = IDLE_TIMEOUT_S, event_burst: float = EVENT_BURST,
                 event_rate: float = EVENT_RATE, admit_burst: float = ADMIT_BURST,
                 admit_rate: float = ADMIT_RATE, proc: Proc | None = None) -> None:
        self.path = path
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

    def _peer(self, sock: socket.socket) -> Peer:
        pid, uid = peer_creds(sock)
        peer = Peer(pid, uid, _user_name(uid), peer_pidfd(sock, pid))
        st = self.proc.stat(pid)
        # The start time is the connecting process's only if it still lives after
        # the read (then the pid was its all along) and is of the uid that connected.
        if st is not None and self.proc.alive(peer.pidfd) and self.proc.uid(pid) == uid:
            peer.start = st[1]
        return peer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            peer = self._peer(sock)
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
                if reply is not None:
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
            vcpus, mem, disk = req.get("vcpus"), req.get("mem_mib"), req.get("disk_mib")
            profile, network = req.get("profile"), req.get("network")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (vcpus, mem)):
                return {"ok": False, "why": f"{op} needs vcpus and mem_mib as positive whole numbers"}
            if disk is not None and not (isinstance(disk, int) and not isinstance(disk, bool) and disk > 0):
                return {"ok": False, "why": f"{op}: disk_mib must be a positive whole number"}
            if not all(v is None or (isinstance(v, str) and 0 < len(v) <= 64) for v in (profile, network)):
                return {"ok": False, "why": f"{op}: profile and network must be short names"}
            shape = {"disk_mib": disk, "profile": profile, "network": network}
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
            grant.holder_pidfd = _dup(peer.pidfd)
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
        if op == "ls":
            grants = [g.listed() for g in self.admissions.grants.values() if uid == 0 or g.uid == uid]
            return {"ok": True, "grants": grants}
        return {"ok": False, "why": f"unknown op {str(op)[:40]!r}"}

    def _release(self, peer: Peer, gid: int, **why) -> Grant | None:
        """Give grant ``gid`` back (its cgroup is the caller's to remove); the grant, or None."""
        grant = self.admissions.grants.get(gid)
        if grant is None:
            return None
        # On record before the place is free: whoever sees it free sees the entry.
        self._own("release", user=peer.user, uid=peer.uid, grant=gid, kernel_id=grant.kernel_id, **why)
        self.admissions.release(gid)
        _close_grant_fds(grant)
        return grant

    def _event(self, peer: Peer, held: set[int], req: dict) -> None:
        """A user's audit event: an allowed name, allowed fields, within the
        user's rate, marked as the user's; else counted as dropped."""
        event, fields = req.get("event"), req.get("fields")
        if not isinstance(event, str) or event not in USER_EVENTS or not self._take("event", peer.uid):
            self._drop(peer)
            return
        clean = {}
        for k, v in (fields.items() if isinstance(fields, dict) else ()):
            if k in USER_FIELDS and (v := _clean_value(v)) is not None:
                clean[k] = v
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
        grant.joined_pid, grant.joined_pidfd = pid, _dup(peer.pidfd)
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


def _dup(fd: int | None) -> int | None:
    try:
        return os.dup(fd) if fd is not None else None
    except OSError:
        return None


def _close_grant_fds(grant: Grant) -> None:
    for name in ("holder_pidfd", "joined_pidfd"):
        fd = getattr(grant, name)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
            setattr(grant, name, None)


def serve(path: str = SOCKET_PATH) -> int:
    """Run the service until interrupted (``smolvm-kernel hostd``)."""
    pol = policy_mod.load()
    service = HostService(path, pol)

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
