"""hostd's callers: who is on a connection, and what a caller may send.

Who: from the kernel, never from anything sent: the peer's pid and uid
(SO_PEERCRED), a pidfd of that very process (SO_PEERPIDFD, else pidfd_open)
and its start time, so that a pid reused by another process is told apart
(:class:`Peer`, :class:`Proc`).

What: an admit's or check's shape must be whole numbers and short names
(:func:`request_shape`); a user's audit event must be one of USER_EVENTS and
carries only USER_FIELDS, with values size-capped (:func:`user_fields`); each
non-root uid's events and admissions come at a bounded rate (:class:`Bucket`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pwd
import select
import socket
import struct
import time

from smolvm_kernel.host import procs

#: The events users' kernels and servers may write (what sandbox.py, kernel.py,
#: pause.py and classroom.py send today). Never admit, release, join or
#: events_dropped: those are the service's own.
USER_EVENTS = frozenset({"start", "stop", "death", "reset", "push", "pull", "refused",
                         "pause", "resume", "culled", "checkpoint", "restore", "fork", "checkpoint_rm"})
#: The fields those events may carry; any other is dropped (``by``, ``uid``,
#: ``user``, ``ts``, ``host``, ``pid`` are the service's).
USER_FIELDS = frozenset({"vm_id", "kernel_id", "profile", "vcpus", "mem_mib", "disk_mib", "network",
                         "transport", "backend", "accel", "boot_s", "started_from", "ran_s", "cause",
                         "path", "bytes", "idle_s", "state_bytes", "pause_s", "vmm_rss_kib", "paused_s",
                         "resume_s", "what", "why", "idle_timeout_s", "name", "save_s", "after_cell",
                         "restore_s", "n", "forked_from"})
#: A user's string value is cut to this many characters.
USER_VALUE_MAX = 1024
#: Per non-root uid: events (burst, per second) and admissions (burst, per second).
EVENT_BURST, EVENT_RATE = 200, 5.0
ADMIT_BURST, ADMIT_RATE = 30, 0.2
#: Linux's SO_PEERPIDFD (6.5+): a pidfd of the very process that connected.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


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
        value = procs.status_field(pid, "Uid")
        try:
            return int(value) if value is not None else None
        except ValueError:
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


def peer_of(sock: socket.socket, proc: Proc) -> Peer:
    """Who is on ``sock``: its pid, uid, user name, a pidfd and its start time."""
    pid, uid = peer_creds(sock)
    peer = Peer(pid, uid, user_name(uid), peer_pidfd(sock, pid))
    st = proc.stat(pid)
    # The start time is the connecting process's only if it still lives after
    # the read (then the pid was its all along) and is of the uid that connected.
    if st is not None and proc.alive(peer.pidfd) and proc.uid(pid) == uid:
        peer.start = st[1]
    return peer


def peer_creds(sock: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and uid, from the kernel (not from anything it sent)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def dup(fd: int | None) -> int | None:
    """A descriptor of its own for what ``fd`` refers to (a grant keeps a peer's pidfd past the peer), or None."""
    try:
        return os.dup(fd) if fd is not None else None
    except OSError:
        return None


def request_shape(op: str, req: dict) -> tuple[int, int, dict] | str:
    """The shape an ``admit`` or ``check`` asks for (vcpus, mem_mib, the
    keywords disk_mib, profile and network), or why it is malformed."""
    vcpus, mem, disk = req.get("vcpus"), req.get("mem_mib"), req.get("disk_mib")
    profile, network = req.get("profile"), req.get("network")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (vcpus, mem)):
        return f"{op} needs vcpus and mem_mib as positive whole numbers"
    if disk is not None and not (isinstance(disk, int) and not isinstance(disk, bool) and disk > 0):
        return f"{op}: disk_mib must be a positive whole number"
    if not all(v is None or (isinstance(v, str) and 0 < len(v) <= 64) for v in (profile, network)):
        return f"{op}: profile and network must be short names"
    return vcpus, mem, {"disk_mib": disk, "profile": profile, "network": network}


def user_fields(fields) -> dict:
    """The fields of a user's event that are written: USER_FIELDS only, values
    cleaned (:func:`clean_value`), any other dropped."""
    clean = {}
    for k, v in (fields.items() if isinstance(fields, dict) else ()):
        if k in USER_FIELDS and (v := clean_value(v)) is not None:
            clean[k] = v
    return clean


def clean_value(v):
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
