"""A cgroup of its own for each VMM: memory, CPU and pids limits from the VM's shape.

The guest's memory is bounded by the VM's RAM, but the VMM process around it
allocates more (QEMU's TCG translation cache, device buffers, its heap), and
a VMM bug a guest can reach could allocate without bound. Each VMM runs in a
cgroup that caps what its process can take from the host:

* memory: the guest's RAM plus a fixed overhead (``vmm_overhead_mib``), no swap;
* CPU: ``cpu_limit`` cores (default: one per vCPU);
* pids: enough threads for the VMM, never a fork bomb.

The VMM joins its cgroup before it execs (:meth:`VMGroup.join`, in the child),
so every page it ever touches is charged there. Where the cgroups live:

* cgroup v2 (the unified hierarchy with the memory controller): ``smolvm/<vm>``
  under the hierarchy's root (a v2 cgroup that holds processes, such as the
  kernel's own, cannot also hand controllers to children);
* cgroup v1 (one hierarchy per controller): ``<own cgroup>/smolvm/<vm>`` in the
  memory, cpu and pids hierarchies, so whatever limits the host put on the
  kernel's own cgroup still hold for its VMs.

Without a writable hierarchy (not root, no delegation, a container that
hides it), VMs run without one: :func:`probe` says why, ``smolvm-kernel
doctor`` prints it and each VM's status says ``cgroup: none (<why>)``.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger("smolvm_kernel.host.cgroups")

#: Name of the folder that holds one cgroup per VM.
PARENT = "smolvm"
#: The folder of the admission service's cgroups (hostd.py): every grant's
#: cgroup (``hostd-<grant>-<pid>``) goes in it, and hostd puts the host-wide caps
#: on it (:func:`set_parent_limits`). It is the VMs' folder itself, so that what
#: knows a VMM's group by ``/smolvm/hostd-*`` (the classroom's sweeper,
#: confine.py) still does; a kernel's own VM cgroups there (no hostd) share the caps.
HOSTD_PARENT = PARENT
#: Threads a VMM may have: QEMU runs a vCPU thread each, its main loop, RCU,
#: and a pool of up to 64 I/O workers; it never forks (its seccomp filter denies it).
PIDS_BASE = 96
CPU_PERIOD_US = 100_000
_VM_DIR = re.compile(r"^[0-9a-f]{12}$")


@dataclasses.dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_quota_us: int
    cpu_period_us: int
    pids: int

    @classmethod
    def for_shape(cls, mem_mib: int, vcpus: int, overhead_mib: int, cpu_limit: float = 0.0) -> Limits:
        cores = cpu_limit if cpu_limit > 0 else float(vcpus)
        return cls(memory_bytes=(mem_mib + overhead_mib) * 2**20,
                   cpu_quota_us=max(1000, round(cores * CPU_PERIOD_US)), cpu_period_us=CPU_PERIOD_US,
                   pids=PIDS_BASE + 2 * vcpus)

    def describe(self) -> str:
        return (f"memory {self.memory_bytes // 2**20} MiB, CPU {self.cpu_quota_us / self.cpu_period_us:g} "
                f"cores, {self.pids} threads")


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """Where this process can make VM cgroups: ``parents`` maps each controller
    (memory, cpu, pids) to the folder that holds the VMs' cgroups."""

    version: int
    parents: dict[str, Path]

    def describe(self) -> str:
        where = sorted({str(p) for p in self.parents.values()})
        return f"cgroup v{self.version}: " + ", ".join(where)


@dataclasses.dataclass
class VMGroup:
    """One VM's cgroup (v2: one folder; v1: one per controller)."""

    vm_id: str
    dirs: list[Path]
    limits: Limits
    version: int

    def join(self) -> None:
        """Move the calling process in. Runs in the VMM's child between fork and
        exec, so it only writes files (no logging, no locks)."""
        join_dirs(self.dirs)

    def oom_kills(self) -> int:
        """How many times the kernel killed a process here for going over the memory limit."""
        for d in self.dirs:
            for name in ("memory.events", "memory.oom_control"):
                try:
                    text = (d / name).read_text()
                except OSError:
                    continue
                m = re.search(r"^oom_kill (\d+)$", text, re.M)
                if m:
                    return int(m.group(1))
        return 0

    def memory_peak(self) -> int | None:
        """The most memory charged here at once, in bytes (where the kernel tells)."""
        for d in self.dirs:
            for name in ("memory.peak", "memory.max_usage_in_bytes"):
                try:
                    return int((d / name).read_text())
                except (OSError, ValueError):
                    continue
        return None

    def cpu_seconds(self) -> float | None:
        """CPU time used here (v2 cpu.stat; v1 has it only with cpuacct, not used)."""
        for d in self.dirs:
            try:
                m = re.search(r"^usage_usec (\d+)$", (d / "cpu.stat").read_text(), re.M)
            except OSError:
                continue
            if m:
                return int(m.group(1)) / 1e6
        return None

    def remove(self, wait: float = 2.0) -> bool:
        """Remove the folders once the VMM has left them (it has exited); True when gone."""
        return remove_dirs(self.dirs, wait)


def join_dirs(dirs: list[Path]) -> None:
    """Move the calling process into the cgroup folders ``dirs``. Safe between
    fork and exec: it only writes files (no logging, no locks)."""
    pid = str(os.getpid()).encode()
    for d in dirs:
        fd = os.open(d / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def remove_dirs(dirs: list[Path], wait: float = 2.0) -> bool:
    """Remove cgroup folders once their processes have left (within ``wait``
    seconds: an exiting process is still being reaped); True when gone."""
    deadline = time.monotonic() + wait
    left = list(dirs)
    while left:
        d = left[0]
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            log.warning("could not remove cgroup %s: %s", d, exc)
            return False
        left.pop(0)
    return True


def _mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        found.append((point, tail[0], set(tail[2].split(","))))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller -> this process's cgroup path ("" is the v2 entry)."""
    paths = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctl in parts[1].split(",") if parts[1] else [""]:
                paths[ctl] = parts[2]
    return paths


def find_hierarchy(mountinfo: str, proc_cgroup: str, parent_name: str = PARENT) -> Hierarchy | str:
    """The hierarchy VM cgroups go in, or why there is none (pure: unit-tested)."""
    mounts = _mounts(mountinfo)
    own = _own_paths(proc_cgroup)
    for point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        try:
            controllers = set(Path(point, "cgroup.controllers").read_text().split())
        except OSError:
            continue
        if "memory" in controllers:
            parent = Path(point, parent_name)
            return Hierarchy(2, {c: parent for c in ("memory", "cpu", "pids")})
    parents: dict[str, Path] = {}
    for point, fstype, opts in mounts:
        if fstype != "cgroup":
            continue
        for ctl in ("memory", "cpu", "pids"):
            if ctl in opts and ctl not in parents and ctl in own:
                parents[ctl] = Path(point + own[ctl].rstrip("/"), parent_name)
    if "memory" in parents:
        return Hierarchy(1, parents)
    return "no cgroup hierarchy with the memory controller is mounted"


@functools.lru_cache(maxsize=4)
def probe(parent_name: str = PARENT) -> Hierarchy | str:
    """This host's hierarchy if VM cgroups can be made in it, else the reason."""
    try:
        found = find_hierarchy(Path("/proc/self/mountinfo").read_text(),
                               Path("/proc/self/cgroup").read_text(), parent_name)
    except OSError as exc:
        return f"cannot read this process's cgroups ({exc})"
    if isinstance(found, str):
        return found
    try:
        for ctl, parent in found.parents.items():
            _make_parent(found.version, parent)
    except OSError as exc:
        return f"{parent} is not writable ({exc.strerror}); run as root or delegate a cgroup subtree"
    return found


def _make_parent(version: int, parent: Path) -> None:
    parent.mkdir(exist_ok=True)
    if version == 2:
        # Both the root and our folder must hand the controllers down.
        for d in (parent.parent, parent):
            have = set((d / "cgroup.subtree_control").read_text().split())
            want = {"memory", "cpu", "pids"} & set((d / "cgroup.controllers").read_text().split())
            if want - have:
                (d / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(want - have)))


def create(vm_id: str, limits: Limits, parent_name: str = PARENT) -> VMGroup | str:
    """A cgroup for one VM with ``limits`` set, or why there is none."""
    where = probe(parent_name)
    if isinstance(where, str):
        return where
    dirs: list[Path] = []
    try:
        for parent in sorted(set(where.parents.values())):
            d = parent / vm_id
            d.mkdir()
            dirs.append(d)
        group = VMGroup(vm_id, dirs, limits, where.version)
        _write_limits(where, vm_id, limits)
    except OSError as exc:
        VMGroup(vm_id, dirs, limits, where.version).remove(wait=0)
        return f"could not set up its cgroup ({exc})"
    return group


def set_parent_limits(parent_name: str, limits: Limits) -> Hierarchy | str:
    """Cap the folder that holds the VMs' cgroups as a whole (hostd's host-wide
    caps: every VMM in it together gets at most ``limits``); the hierarchy, or why not."""
    where = probe(parent_name)
    if isinstance(where, str):
        return where
    if where.version == 1:
        # Children are charged to this folder too (always so on recent kernels;
        # writable only while the folder has no children).
        try:
            (where.parents["memory"] / "memory.use_hierarchy").write_text("1")
        except OSError:
            pass
    try:
        _write_limits(where, "", limits)
    except OSError as exc:
        return f"could not cap {parent_name} ({exc})"
    return where


def _write_limits(where: Hierarchy, vm_id: str, limits: Limits) -> None:
    mem, cpu, pids = ((where.parents[c] / vm_id if vm_id else where.parents[c]) if c in where.parents else None
                      for c in ("memory", "cpu", "pids"))
    if where.version == 2:
        (mem / "memory.max").write_text(str(limits.memory_bytes))
        _write_if_present(mem / "memory.swap.max", "0")
        _write_if_present(cpu / "cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")
        _write_if_present(pids / "pids.max", str(limits.pids))
        return
    # No swap either, where the kernel accounts it: memory+swap gets the same
    # limit. v1 refuses a memory limit above memsw's and memsw below memory's,
    # so on a folder that had limits (a cap changed) the order follows the direction.
    try:
        current = int((mem / "memory.limit_in_bytes").read_text())
    except (OSError, ValueError):
        current = 0
    writes = [(True, "memory.limit_in_bytes"), (False, "memory.memsw.limit_in_bytes")]
    for required, name in (writes if limits.memory_bytes <= current else writes[::-1]):
        if required:
            (mem / name).write_text(str(limits.memory_bytes))
        else:
            _write_if_present(mem / name, str(limits.memory_bytes))
    if cpu is not None:
        (cpu / "cpu.cfs_period_us").write_text(str(limits.cpu_period_us))
        (cpu / "cpu.cfs_quota_us").write_text(str(limits.cpu_quota_us))
    if pids is not None:
        (pids / "pids.max").write_text(str(limits.pids))


def _write_if_present(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        pass   # the controller is not enabled here: the others still hold


def _mount_of(d: Path, mounts: list[tuple[str, str, set[str]]]) -> tuple[str, str, set[str]] | None:
    best = None
    for m in mounts:
        point = m[0].rstrip("/") or "/"
        if (str(d) == point or str(d).startswith(point + "/")) and (best is None or len(point) > len(best[0])):
            best = m
    return best


def folders_of(pid: int, dirs: list[Path]) -> list[Path] | None:
    """The folders ``pid`` is in, in the hierarchies of ``dirs`` (one each, same
    order): where to move it back to. None if that cannot be read."""
    try:
        mounts = _mounts(Path("/proc/self/mountinfo").read_text())
        own = _own_paths(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None
    out = []
    for d in dirs:
        m = _mount_of(d, mounts)
        if m is None:
            return None
        point, fstype, opts = m
        key = "" if fstype == "cgroup2" else next((c for c in ("memory", "cpu", "pids") if c in opts), None)
        if key is None or key not in own:
            return None
        out.append(Path(point.rstrip("/") + own[key].rstrip("/") or "/"))
    return out


def sweep(is_live) -> list[str]:
    """Remove VM cgroups left by kernels that died (``is_live(vm_id)`` is False)."""
    where = probe()
    if isinstance(where, str):
        return []
    done = []
    for parent in sorted(set(where.parents.values())):
        try:
            children = [d for d in parent.iterdir() if d.is_dir() and _VM_DIR.match(d.name)]
        except OSError:
            continue
        for d in children:
            if is_live(d.name):
                continue
            try:
                d.rmdir()
                done.append(f"removed cgroup {d}")
            except OSError:
                pass   # still has a process: the registry kills it first, a later sweep removes it
    return done
