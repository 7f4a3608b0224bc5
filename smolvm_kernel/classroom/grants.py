"""What hostd grants: the quota and budget arithmetic, a grant's record, the host-wide caps.

Apart from sockets (unit-tested without a service). The shape is checked
here, from the policy the service read, not taken from the caller: vcpus <=
max_vcpus and <= this host's cores, mem_mib <= max_mem_mib and <= the host's
memory, disk_mib <= max_disk_mib, profile in profiles, network in network. A
request that leaves out disk_mib, profile or network is refused when the
policy caps that key (an older client: update it). A refusal names the key,
the value asked and the policy file.

Every grant's cgroup sits in one folder (cgroups.HOSTD_PARENT: ``smolvm`` in
each hierarchy), on which the service puts the host-wide caps
(:func:`host_limits`): memory = the host's RAM less host_reserve_mib (less a
tenth, at most 2 GiB, without one), and at most host_max_guest_mem_mib plus
each VM's VMM overhead; CPU = the host's cores; pids = enough for
host_max_vms VMMs (64 without it).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time

from smolvm_kernel.host import cgroups
from smolvm_kernel.host import policy as policy_mod
from smolvm_kernel.host import procs
from smolvm_kernel.host.admission import AdmissionRefused

#: Sane bounds with or without a policy: a disk of at most 1 TiB.
MAX_DISK_MIB = 1 << 20


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

    def close_fds(self) -> None:
        """Close the holder's and the joined VMM's pidfds (the grant is given back)."""
        for name in ("holder_pidfd", "joined_pidfd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)


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
