"""A root-made cgroup for each student of a classroom, and the sweeper that keeps
every process of theirs in it.

The classroom assumes a student may run code on the host as themselves one day
(their Jupyter server is a large program that reads files they control; see
docs/classroom.md). What then holds is that every process of theirs sits in a
cgroup root made, with CPU, memory and task limits the instructor chose, that
the student cannot leave (only root writes its ``cgroup.procs``):

* the hub's spawner (classroom.ClassroomSpawner) makes the student's group
  and moves the single-user server into it between fork and exec, before it
  drops privileges, so the server and everything it starts are inside from
  their first instruction;
* the VMMs of the student's kernels leave it for the cgroup hostd made for
  their grant (hostd.py), sized by the instructor's policy: those stay;
* anything of a student's uid that is in neither (a process started by some
  other route: su, ssh, cron, a setuid helper) is moved in by
  ``smolvm-kernel classroom confine``, a root service the hub runs, within
  about a second (:func:`sweep`).

Where the groups live: the same hierarchy cgroups.py uses for VMs, in a sibling
folder ``smolvm-students/<name>`` (v1: under this process's own cgroup in the
memory, cpu and pids hierarchies; v2: under the root). With systemd, the same
role is played by the user's slice (pam_systemd's ``user-<uid>.slice``, sized
with ``systemctl set-property``) and SystemdSpawner's per-server scope.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import time
from pathlib import Path

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.host import cgroups

#: The Unix group of a classroom's students (classroom.py makes it).
GROUP = "smolvm-students"

PARENT = "smolvm-students"
#: Defaults: JupyterLab (~150 MiB), a few kernels' host processes (~80 MiB each),
#: headroom for a pip or nbconvert run; one core; enough tasks for the server's
#: and kernels' threads, never a fork bomb.
DEFAULT_MEM_MIB = 1024
DEFAULT_CPUS = 1.0
DEFAULT_TASKS = 512
_HOSTD_GROUP = re.compile(r"/" + re.escape(cgroups.PARENT) + r"/hostd-[^/]+$")
_NAME = re.compile(r"^[a-z_][a-z0-9_-]*[$]?$")


@dataclasses.dataclass(frozen=True)
class StudentLimits:
    mem_mib: int = DEFAULT_MEM_MIB
    cpus: float = DEFAULT_CPUS
    tasks: int = DEFAULT_TASKS

    @classmethod
    def of(cls, mem_mib: int | None = None, cpus: float | None = None, tasks: int | None = None) -> StudentLimits:
        """The limits a command line or set-up asked for, the defaults where it did not."""
        return cls(mem_mib or DEFAULT_MEM_MIB, cpus or DEFAULT_CPUS, tasks or DEFAULT_TASKS)

    def describe(self) -> str:
        return f"memory {self.mem_mib} MiB, CPU {self.cpus:g} cores, {self.tasks} tasks"

    def cgroup_limits(self) -> cgroups.Limits:
        return cgroups.Limits(memory_bytes=self.mem_mib * 2**20,
                              cpu_quota_us=max(1000, round(self.cpus * cgroups.CPU_PERIOD_US)),
                              cpu_period_us=cgroups.CPU_PERIOD_US, pids=self.tasks)


def parents() -> tuple[int, dict[str, Path]]:
    """(cgroup version, controller -> the folder holding the students' groups)."""
    where = cgroups.probe()
    if isinstance(where, str):
        raise SmolVMError(f"no cgroup for the students' processes: {where}")
    return where.version, {ctl: p.parent / PARENT for ctl, p in where.parents.items()}


def group_dirs(name: str) -> list[Path]:
    if not _NAME.match(name):
        raise SmolVMError(f"not a user name: {name!r}")
    version, found = parents()
    return sorted({p / name for p in found.values()})


def ensure(name: str, limits: StudentLimits) -> list[Path]:
    """Make (or update) ``name``'s group with ``limits``; its folders. Root only."""
    version, found = parents()
    for parent in sorted(set(found.values())):
        cgroups._make_parent(version, parent)
    dirs = group_dirs(name)
    for d in dirs:
        d.mkdir(exist_ok=True)
    cgroups._write_limits(cgroups.Hierarchy(version, found), name, limits.cgroup_limits())
    if version == 1:
        # A process moved in later (by the sweeper) brings its memory with it, where
        # the kernel still can (deprecated in Linux 6.x, which refuses it).
        try:
            cgroups._write_if_present(found["memory"] / name / "memory.move_charge_at_immigrate", "3")
        except OSError:
            pass
    return dirs


def remove(name: str) -> None:
    """Remove ``name``'s group once its processes are gone."""
    try:
        dirs = group_dirs(name)
    except SmolVMError:
        return
    cgroups.remove_dirs(dirs, wait=5.0)


def students() -> dict[int, str]:
    """uid -> name of every member of the classroom's group."""
    try:
        members = grp.getgrnam(GROUP).gr_mem
    except KeyError:
        return {}
    out = {}
    for name in members:
        try:
            out[pwd.getpwnam(name).pw_uid] = name
        except KeyError:
            pass
    return out


def _uids(status: str) -> set[int]:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return {int(x) for x in line.split()[1:3]}     # real and effective
    return set()


def placed(proc_cgroup: str, name: str, version: int) -> dict[str, bool]:
    """Controller -> whether a process with this /proc/<pid>/cgroup is where a
    process of student ``name`` may be: their own group, or a VMM group hostd made."""
    paths = cgroups._own_paths(proc_cgroup)
    ctls = [""] if version == 2 else ["memory", "cpu", "pids"]
    out = {}
    for ctl in ctls:
        p = paths.get(ctl)
        if p is None:
            continue
        out[ctl] = p.rstrip("/").endswith(f"/{PARENT}/{name}") or bool(_HOSTD_GROUP.search(p))
    return out


def sweep(limits: StudentLimits, known: dict[int, str] | None = None) -> list[str]:
    """Move every process of a student that is outside their group (and outside
    hostd's VMM groups) into it; a line for each process moved."""
    known = students() if known is None else known
    if not known:
        return []
    version, found = parents()
    done, made = [], set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            uids = _uids((d / "status").read_text())
            where = (d / "cgroup").read_text()
        except OSError:
            continue
        mine = [known[u] for u in uids if u in known]
        if not mine:
            continue
        name = mine[0]
        outside = [ctl for ctl, ok in placed(where, name, version).items() if not ok]
        if not outside:
            continue
        if name not in made:
            ensure(name, limits)
            made.add(name)
        moved = []
        for ctl in outside:
            target = (found["memory"] if version == 2 else found.get(ctl))
            if target is None:
                continue
            try:
                (target / name / "cgroup.procs").write_text(d.name)
                moved.append(ctl or "unified")
            except OSError:
                pass        # it exited, or is a zombie
        if moved:
            done.append(f"moved pid {d.name} of {name} into its group ({', '.join(moved)})")
    return done


def serve(limits: StudentLimits, interval: float = 1.0) -> int:
    """The sweeper: :func:`sweep` every ``interval`` seconds, forever (root)."""
    import sys

    if os.geteuid() != 0:
        raise SmolVMError("the students' cgroup sweeper moves their processes: run it as root")
    parents()     # fail now, not in the loop, on a host without a hierarchy
    print(f"confining students' processes ({limits.describe()} each), every {interval:g} s", flush=True)
    while True:
        try:
            for line in sweep(limits):
                print(line, flush=True)
        except Exception as exc:  # noqa: BLE001 - keep sweeping; say what went wrong
            print(f"sweep failed: {exc}", file=sys.stderr, flush=True)
        time.sleep(interval)
