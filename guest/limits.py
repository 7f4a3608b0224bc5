"""The guest kernel's own cgroup inside the VM: what a cell can take from the
agent that serves it.

The host bounds the whole VM (its VMM's cgroup); this bounds the kernel's user
inside it, so that whatever a cell does, the agent (root, in the root cgroup)
keeps memory, CPU time and process slots to answer the host:

- ``pids.max``: a fork bomb stops at KERNEL_PIDS tasks; when the group meets
  that or its memory limit, the agent interrupts the cell and kills what it
  started (see :meth:`KernelCgroup.reap_after_limit`), not the kernel;
- ``memory.max``: the VM's available memory when the kernel starts, less
  AGENT_HEADROOM_KIB, so a memory bomb (or a fork bomb's copies) meets an
  out-of-memory kill inside this group (which the agent reports) before the
  VM as a whole runs out, and the agent, init and the guest's kernel keep
  theirs;
- CPU: the group competes as one entity with the agent, so a busy loop on
  every vCPU (or hundreds of them) leaves the agent its share.

init mounts cgroup2 on /sys/fs/cgroup (init.py). Without it (an older image's
kernel), KernelCgroup.create returns None and the kernel runs unbounded, as
before.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ROOT = "/sys/fs/cgroup"
#: Rewritten (root's, readable by the kernel's user) each time the agent kills
#: at a limit. A killed child of the kernel stays a zombie, holding a slot of
#: pids.max, until its parent waits: a new mtime is the kernel's cue to wait
#: for its zombie children that SIGKILL ended, after the cell (kernel_warmup.py).
#: The pids it lists are for whoever debugs; the kernel does not read them.
KILLED_PIDS_FILE = "/run/smolvm/killed-pids"
#: Tasks (processes and threads) the kernel's user may have at once.
KERNEL_PIDS = 256
#: Memory kept beyond what the rest of the VM uses when the kernel starts:
#: room for the agent's queues under a flood (8 MiB of output at most) and the
#: guest kernel's own growth. Measured on a 512 MiB VM: 469 MiB total, ~73 MiB
#: used outside the kernel's group (agent 21 MiB, init 12 MiB, slab 29 MiB).
AGENT_HEADROOM_KIB = 48 * 1024


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _mem_available_kib() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise OSError("no MemAvailable in /proc/meminfo")


def _write_killed(pids: set[int]) -> None:
    tmp = KILLED_PIDS_FILE + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(" ".join(map(str, sorted(pids))))
        os.rename(tmp, KILLED_PIDS_FILE)
    except OSError as exc:
        print(f"smolvm-agent: {KILLED_PIDS_FILE}: {exc}", file=sys.stderr, flush=True)


class KernelCgroup:
    """One cgroup v2 group for the kernel's process and everything it starts."""

    def __init__(self, path: str, mem_max_kib: int) -> None:
        self.path = path
        self.mem_max_kib = mem_max_kib
        self._counts = self._limit_counts()
        self._checked_at = 0.0

    @classmethod
    def create(cls, name: str = "kernel") -> KernelCgroup | None:
        """Make (or reuse) the group, limits set; None if cgroup2 is not there."""
        try:
            with open(os.path.join(ROOT, "cgroup.controllers")) as fh:
                controllers = fh.read().split()
            wanted = [c for c in ("cpu", "memory", "pids") if c in controllers]
            _write(os.path.join(ROOT, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))
            path = os.path.join(ROOT, name)
            os.makedirs(path, exist_ok=True)
            # What is available now (the kernel has just started) less the
            # headroom: the group's OOM comes before the VM's.
            mem_max = max(_mem_available_kib() - AGENT_HEADROOM_KIB, 64 * 1024)
            if "pids" in wanted:
                _write(os.path.join(path, "pids.max"), str(KERNEL_PIDS))
            if "memory" in wanted:
                _write(os.path.join(path, "memory.max"), str(mem_max * 1024))
                if os.path.exists(os.path.join(path, "memory.oom.group")):
                    _write(os.path.join(path, "memory.oom.group"), "0")   # kill one task, not all
            return cls(path, mem_max)
        except (OSError, ValueError) as exc:
            print(f"smolvm-agent: no cgroup for the kernel: {exc}", file=sys.stderr, flush=True)
            return None

    def add(self, pid: int) -> None:
        _write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as fh:
                return [int(line) for line in fh if line.strip()]
        except (OSError, ValueError):
            return []

    def _events(self, name: str) -> dict[str, int]:
        try:
            with open(os.path.join(self.path, name)) as fh:
                return {k: int(v) for k, v in (line.split() for line in fh if line.strip())}
        except (OSError, ValueError):
            return {}

    def _limit_counts(self) -> tuple[int, int]:
        """(forks refused at pids.max, tasks the group's OOM killer killed)."""
        return (self._events("pids.events").get("max", 0),
                self._events("memory.events").get("oom_kill", 0))

    def reap_after_limit(self, keep: int, force: bool = False) -> tuple[str, int] | None:
        """If the group hit a limit since the last call (a fork refused at
        pids.max, or a task killed by its out-of-memory killer), SIGKILL every
        task in it but the kernel's (``keep``), interrupt the kernel (SIGINT:
        the cell stops) and return which limit ("processes" or "memory") and
        how many processes went; None if no limit was hit. Checked at most
        twice a second unless ``force`` (the agent forces it before relaying
        a cell's reply, so that the note reaches the cell that caused it).

        The group is frozen while it is emptied and the interrupt is queued,
        so a fork bomb can neither refill it in between nor go on after.
        (Measured: a fork bomb's copies of the kernel fill the group's memory
        before its process limit; the OOM killer then kills one copy at a time
        and the bomb refills the slot, without end, unless it is stopped.)"""
        now = time.monotonic()
        if not force and now - self._checked_at < 0.5:
            return None
        self._checked_at = now
        counts = self._limit_counts()
        if counts == self._counts:
            return None
        which = "processes" if counts[0] > self._counts[0] else "memory"
        killed: set[int] = set()
        self._kill_frozen(keep, killed, interrupt=True)
        # Between the thaw and the interrupt's delivery the cell may fork once
        # more, and that copy may fork on: sweep again until the group is quiet.
        for _ in range(10):
            time.sleep(0.1)
            if not self._kill_frozen(keep, killed, interrupt=False):
                break
        # Forks refused and kills made while we emptied the group are not new.
        self._counts = self._limit_counts()
        return which, len(killed)

    def _kill_frozen(self, keep: int, killed: set[int], interrupt: bool) -> bool:
        """With the group frozen, SIGKILL all but ``keep`` (and SIGINT ``keep``);
        False if there was nothing to kill."""
        if not [pid for pid in self.pids() if pid != keep] and not interrupt:
            return False
        freeze = os.path.join(self.path, "cgroup.freeze")
        try:
            _write(freeze, "1")
        except OSError:
            freeze = ""
        try:
            for _ in range(8):
                victims = [pid for pid in self.pids() if pid != keep]
                if not victims:
                    break
                for pid in victims:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            _write_killed(killed)
            if interrupt:
                try:
                    os.kill(keep, signal.SIGINT)
                except ProcessLookupError:
                    pass
        finally:
            if freeze:
                _write(freeze, "0")
        return True
