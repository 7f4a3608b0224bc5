"""Where VM cgroups go and what limits they get (no VM; see tests/vm/test_vmm_cgroups.py)."""

from __future__ import annotations

from pathlib import Path

from smolvm_kernel.host import cgroups

V1_MOUNTS = """\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
33 25 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_SELF = "8:pids:/\n4:memory:/service/abc\n1:cpu:/\n0::/\n"


def test_v1_nests_under_the_kernels_own_memory_cgroup(tmp_path):
    found = cgroups.find_hierarchy(V1_MOUNTS.replace("/sys/fs/cgroup/unified", str(tmp_path)), V1_SELF)
    assert found.version == 1
    assert found.parents == {"memory": Path("/sys/fs/cgroup/memory/service/abc/smolvm"),
                             "cpu": Path("/sys/fs/cgroup/cpu/smolvm"),
                             "pids": Path("/sys/fs/cgroup/pids/smolvm")}


def test_v2_with_the_memory_controller_wins(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mounts = f"33 25 0:29 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
    found = cgroups.find_hierarchy(mounts, "0::/user.slice/session-1.scope\n")
    assert found.version == 2 and set(found.parents.values()) == {tmp_path / "smolvm"}


def test_a_v2_hierarchy_without_controllers_and_no_v1_is_a_reason(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("\n")
    mounts = f"33 25 0:29 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw\n"
    reason = cgroups.find_hierarchy(mounts, "0::/\n")
    assert isinstance(reason, str) and "memory controller" in reason


def test_limits_follow_the_shape():
    limits = cgroups.Limits.for_shape(mem_mib=512, vcpus=2, overhead_mib=256)
    assert limits.memory_bytes == 768 * 2**20
    assert (limits.cpu_quota_us, limits.cpu_period_us) == (200_000, 100_000)
    assert limits.pids == cgroups.PIDS_BASE + 4
    assert cgroups.Limits.for_shape(512, 2, 256, cpu_limit=0.5).cpu_quota_us == 50_000
    assert limits.describe() == "memory 768 MiB, CPU 2 cores, 100 threads"
