"""Each VMM in a cgroup of its own, limits from the VM's shape (smolvm_kernel/cgroups.py).

On real VMs: the VMM is in its group from its first instruction, the limits
are what the shape says, a VMM over its memory limit is stopped and the
error says so, the default overhead holds a guest that fills its RAM, a CPU
limit holds against a busy guest, and the groups go with their VMs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from smolvm_kernel.errors import GuestDied
from smolvm_kernel.host import cgroups
from smolvm_kernel.vm.sandbox import Sandbox


@pytest.fixture(autouse=True)
def _needs_cgroups(image):
    where = cgroups.probe()
    if isinstance(where, str):
        pytest.skip(f"no writable cgroup hierarchy on this host: {where}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def _read(group: cgroups.VMGroup, *names: str) -> str:
    for d in group.dirs:
        for name in names:
            if (d / name).exists():
                return (d / name).read_text().split()[0]
    raise AssertionError(f"none of {names} in {group.dirs}")


def test_the_vmm_runs_in_its_own_cgroup_with_limits_from_its_shape():
    with Sandbox(vcpus=2, mem_mib=512, backend="qemu") as sb:
        group = sb.backend.spec.cgroup
        assert group is not None and group.vm_id == sb.vm_id
        own = Path(f"/proc/{sb.backend.pid}/cgroup").read_text()
        memory_line = next(line for line in own.splitlines()
                           if line.split(":")[1] in ("memory", ""))
        assert memory_line.endswith(f"/smolvm/{sb.vm_id}"), own
        assert int(_read(group, "memory.max", "memory.limit_in_bytes")) == (512 + 256) * 2**20
        assert _read(group, "pids.max") == str(cgroups.PIDS_BASE + 4)
        quota = (_read(group, "cpu.max") if group.version == 2 else _read(group, "cpu.cfs_quota_us"))
        assert quota == "200000"
        assert "memory 768 MiB, CPU 2 cores" in sb.stats()["cgroup"]
        dirs = list(group.dirs)
        assert all(d.is_dir() for d in dirs)
    assert not any(d.exists() for d in dirs), "the VM's cgroup outlived it"


def test_a_vmm_over_its_memory_limit_is_stopped_and_the_error_says_why():
    """A cold boot writes all of guest RAM (init_on_free), so with no overhead
    allowed the VMM must go over mem_mib: the host stops it, the error names the
    limit and the setting, and nothing is left."""
    def vm_dirs() -> set:
        return {d for parent in set(cgroups.probe().parents.values()) for d in parent.iterdir()
                if d.is_dir() and cgroups._VM_DIR.match(d.name)}

    others = vm_dirs()          # live VMs of other tests' fixtures
    sb = Sandbox(vcpus=1, mem_mib=256, backend="qemu", snapshot="off", vmm_overhead_mib=0)
    with pytest.raises(GuestDied) as info:
        sb.start()
    assert "over its host memory limit of 256 MiB" in str(info.value), str(info.value)
    assert "vmm_overhead_mib" in str(info.value)
    assert vm_dirs() - others == set()


def test_the_default_overhead_holds_a_guest_that_fills_its_memory():
    with Sandbox(vcpus=2, mem_mib=512, backend="qemu") as sb:
        group = sb.backend.spec.cgroup
        with pytest.raises(GuestDied, match="out of memory in the VM"):
            list(sb.execute("hog = []\nwhile True:\n    hog.append(bytearray(32 * 2**20))", timeout=180))
        # The guest's OOM killer acted, not the host's: the VMM is alive, under its limit.
        assert sb.backend.poll() is None and group.oom_kills() == 0, "the VMM went over its limit"
        peak = group.memory_peak()
        print(f"VMM peak with a full 512 MiB guest: {peak / 2**20:.0f} MiB of {group.limits.memory_bytes // 2**20}")
        assert peak <= group.limits.memory_bytes


def test_a_cpu_limit_holds_against_a_busy_guest():
    """One busy vCPU under TCG keeps a host core busy; cpu_limit=0.5 halves it.
    (The default shape, so that the VM starts from its ready snapshot.)"""
    with Sandbox(vcpus=2, mem_mib=512, backend="qemu", cpu_limit=0.5) as sb:
        pid = sb.backend.pid
        cell = threading.Thread(target=lambda: list(sb.execute(
            "import time\nt = time.time()\nwhile time.time() - t < 6: pass")))
        cell.start()
        time.sleep(1.5)
        c0, w0 = _cpu_seconds(pid), time.monotonic()
        time.sleep(3.0)
        used = (_cpu_seconds(pid) - c0) / (time.monotonic() - w0)
        cell.join(30)
    print(f"a guest with one busy vCPU under cpu_limit=0.5: the VMM used {used:.2f} cores")
    assert 0.2 < used < 0.65, used
