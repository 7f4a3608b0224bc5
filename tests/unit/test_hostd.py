"""The host's admission service: quotas per user, the host's budget, grants
that end with their connection, audit entries under the uid the kernel sees."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from smolvm_kernel.classroom.grants import Admissions
from smolvm_kernel.classroom.hostd import HostService
from smolvm_kernel.host import policy
from smolvm_kernel.host.admission import AdmissionRefused, HostClient
from smolvm_kernel.host.audit import AuditLog

from support import loop_thread, remove_cgroup_parent, wait_for


def _policy(**caps) -> policy.Policy:
    return policy.Policy("/etc/smolvm/policy.toml", **caps)


def test_a_users_vm_count_and_memory_are_capped_and_say_so():
    adm = Admissions(_policy(max_vms_per_user=2, max_mem_mib_per_user=1024), lambda: 100_000)
    adm.admit(1001, "ana", 2, 512)
    adm.admit(1002, "ben", 2, 512)                   # another student's count is their own
    with pytest.raises(AdmissionRefused, match="ana's microVMs have 512 MiB and this one asks for "
                                               "768 MiB, over the 1024 MiB"):
        adm.admit(1001, "ana", 2, 768)
    second = adm.admit(1001, "ana", 1, 512)
    with pytest.raises(AdmissionRefused, match="ana has 2 microVMs running, the most the instructor's "
                                               "policy .* allows per user \\(2\\): close another"):
        adm.admit(1001, "ana", 1, 256)
    adm.release(second.id)
    adm.admit(1001, "ana", 1, 256)


def test_the_host_budget_and_its_reserve_hold_across_users():
    free = {"mib": 3000}
    adm = Admissions(_policy(host_max_vms=3, host_max_guest_mem_mib=1500, host_reserve_mib=1000),
                     lambda: free["mib"])
    adm.admit(1001, "ana", 1, 512)
    adm.admit(1002, "ben", 1, 512)
    with pytest.raises(AdmissionRefused, match="this host's microVMs have 1024 MiB of its 1500 MiB budget"):
        adm.admit(1003, "cem", 1, 512)
    adm.admit(1003, "cem", 1, 256)
    with pytest.raises(AdmissionRefused, match="this host runs 3 microVMs, its budget"):
        adm.admit(1004, "dan", 1, 64)
    adm.release(1)
    free["mib"] = 1200
    with pytest.raises(AdmissionRefused, match="the host has 1200 MiB free and keeps 1000 MiB for itself"):
        adm.admit(1004, "dan", 1, 256)


def test_without_a_policy_everything_the_host_can_hold_is_admitted():
    adm = Admissions(None, lambda: 0, host_cores=64, host_total_mib=100_000)
    assert [adm.admit(1000, "u", 64, 65536).id for _ in range(3)] == [1, 2, 3]
    with pytest.raises(AdmissionRefused, match="vcpus=65 is more than this host's 64 CPU cores"):
        adm.admit(1000, "u", 65, 512)
    with pytest.raises(AdmissionRefused, match="mem_mib=200000 is more than this host's 100000 MiB"):
        adm.admit(1000, "u", 1, 200_000)
    with pytest.raises(AdmissionRefused, match="disk_mib=2000000 is above the 1048576 MiB"):
        adm.admit(1000, "u", 1, 512, disk_mib=2_000_000)


def test_each_per_vm_cap_of_the_policy_is_hostds_own_check():
    adm = Admissions(_policy(max_vcpus=1, max_mem_mib=512, max_disk_mib=2048, profiles=("base",),
                             network=("none",)), lambda: 100_000, host_cores=64, host_total_mib=100_000)
    ok = {"disk_mib": 2048, "profile": "base", "network": "none"}
    where = r"the instructor's policy \(/etc/smolvm/policy.toml\)"
    for shape, words in (((64, 512, ok), f"vcpus=64 is above the cap of 1 vCPUs per microVM \\(max_vcpus\\) set by {where}"),
                         ((1, 4096, ok), f"mem_mib=4096 is above the cap of 512 MiB per microVM \\(max_mem_mib\\) set by {where}"),
                         ((1, 512, {**ok, "disk_mib": 4096}), "disk_mib=4096 is above the cap of 2048 MiB"),
                         ((1, 512, {**ok, "profile": "gpu"}), "profile='gpu' is not allowed by .* \\(profiles\\)"),
                         ((1, 512, {**ok, "network": "nat"}), "network='nat' is not allowed by .* \\(network\\)"),
                         ((1, 512, {"profile": "base", "network": "none"}), "does not say its disk size \\(disk_mib\\)"),
                         ((1, 512, {"disk_mib": 1, "network": "none"}), "does not say its profile"),
                         ((1, 512, {"disk_mib": 1, "profile": "base"}), "does not say its network")):
        vcpus, mem, extra = shape
        with pytest.raises(AdmissionRefused, match=words):
            adm.admit(1001, "ana", vcpus, mem, **extra)
        with pytest.raises(AdmissionRefused, match=words):
            adm.check(1001, "ana", vcpus, mem, **extra)
    assert not adm.grants
    adm.admit(1001, "ana", 1, 512, **ok)


def test_the_host_wide_caps_of_the_grants_cgroup_folder():
    from smolvm_kernel.classroom.grants import VMM_OVERHEAD_MIB, host_limits

    lim = host_limits(_policy(host_max_guest_mem_mib=4096, host_max_vms=4, host_reserve_mib=2048), 8, 32_768)
    assert lim.memory_bytes == (4096 + 4 * VMM_OVERHEAD_MIB) * 2**20
    assert lim.cpu_quota_us == 8 * lim.cpu_period_us and lim.pids == 4 * (96 + 16)
    lim = host_limits(_policy(host_reserve_mib=30_000), 2, 32_768)           # the reserve binds
    assert lim.memory_bytes == 2768 * 2**20
    assert host_limits(None, 2, 10_000).memory_bytes == 9000 * 2**20          # no policy: keep a tenth


@pytest.fixture(params=[False])
def service(tmp_path, request):
    """The service on a socket in tmp, on a loop thread of its own."""
    log = AuditLog(tmp_path / "audit.jsonl")
    svc = HostService(str(tmp_path / "hostd.sock"), _policy(max_vms_per_user=1), audit=log,
                      host_available_mib=lambda: 100_000, make_cgroups=request.param,
                      cgroup_parent=f"smolvm-hostd-test-{os.getpid()}")
    with loop_thread() as run:
        run(svc.start())
        yield svc
        run(svc.close())
    if request.param:
        remove_cgroup_parent(svc.cgroup_parent)


def test_a_grant_lasts_as_long_as_its_connection(service):
    first = HostClient(service.path)
    first.admit(2, 512, kernel_id="k1")
    second = HostClient(service.path)
    with pytest.raises(AdmissionRefused, match="the host refused to start a microVM: .* has 1 microVM running"):
        second.admit(2, 512, kernel_id="k2")
    first.close()                                        # a kernel that exits, or is killed
    assert wait_for(lambda: not service.admissions.grants)
    second.admit(2, 512, kernel_id="k2")
    assert [g["kernel_id"] for g in second.list()] == ["k2"]
    second.close()
    events = [(e["event"], e.get("kernel_id")) for e in service.audit.read()]
    assert events[:4] == [("admit", "k1"), ("refused", "k2"), ("release", "k1"), ("admit", "k2")]
    assert all(e["uid"] == os.geteuid() for e in service.audit.read())


def test_the_service_writes_events_under_the_uid_it_sees_not_the_one_claimed(service):
    client = HostClient(service.path)
    client.event("push", path="a.csv", bytes=3, uid=0, user="root-claimed", by="hostd", extra="x")
    client.event("admit", grant=1)                        # the service's own: never from a user
    client.list()                                         # the event is in before the answer
    (entry,) = [e for e in service.audit.read() if e["event"] == "push"]
    assert entry["uid"] == os.geteuid() and entry["user"] != "root-claimed" and entry["bytes"] == 3
    assert entry["by"] == "user" and "extra" not in entry
    assert not [e for e in service.audit.read() if e["event"] == "admit"]
    assert not [e for e in service.own_audit.read() if e["event"] == "push"]
    client.close()


def test_garbage_and_unknown_ops_get_an_answer_not_a_crash(service):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(service.path)
    f = sock.makefile("rb")
    for line in (b"not json\n", b"[1]\n", b'{"op": "format-disk"}\n', b'{"op": "admit", "vcpus": -1}\n'):
        sock.sendall(line)
        assert json.loads(f.readline())["ok"] is False
    sock.sendall(b"x" * 100_000 + b"\n")                  # over the line limit: hung up on
    assert f.readline() == b""
    sock.close()
    ok = HostClient(service.path)
    ok.admit(1, 256)
    ok.close()


def test_a_missing_service_says_what_to_do(tmp_path):
    from smolvm_kernel.errors import SmolVMError

    with pytest.raises(SmolVMError, match=r"the host.s admission service .* is not answering .* \(smolvm-kernel hostd\)"):
        HostClient(str(tmp_path / "none.sock"))


def test_ls_shows_each_grants_vm_and_whether_it_is_paused(service):
    client = HostClient(service.path)
    client.admit(1, 256, kernel_id="k1")
    assert client.list()[0]["state"] == "starting"
    client.event("start", vm_id="abc123")
    assert [(g["vm_id"], g["state"]) for g in client.list()] == [("abc123", "running")]
    client.event("pause", vm_id="abc123", state_bytes=1)
    assert client.list()[0]["state"] == "paused"
    client.event("resume", vm_id="abc123")
    assert client.list()[0]["state"] == "running"
    client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="making cgroups needs root")
@pytest.mark.parametrize("service", [True], indirect=True)
def test_a_grants_vmm_cgroup_takes_only_the_holders_child(service):
    """The VMM's process, between fork and exec, asks hostd to move it into the
    grant's cgroup: only a child of the grant's holder gets in, one at a time,
    and the cgroup goes with the grant."""
    import subprocess
    import sys

    from smolvm_kernel.host import cgroups

    if isinstance(cgroups.probe(), str):
        pytest.skip(f"no cgroup hierarchy here: {cgroups.probe()}")
    client = HostClient(service.path)
    client.admit(1, 256, kernel_id="k1")
    group = client.cgroup
    assert group is not None and group.limits.memory_bytes == (256 + 256) * 2**20
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], preexec_fn=group.join)
    try:
        mine = Path(f"/proc/{child.pid}/cgroup").read_text()
        assert f"hostd-{client.grant}-" in mine
        # A grandchild (not the holder's own child) is refused.
        join = ("import sys, json, socket; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(json.dumps({'op': 'join', 'grant': int(sys.argv[2])}).encode() + bytes([10])); "
                "print(s.makefile().readline())")
        via = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]])"
        out = subprocess.run([sys.executable, "-c", via, join, service.path, str(client.grant)],
                             capture_output=True, text=True, timeout=30)
        assert "only a child of the process holding the grant" in out.stdout, out
        direct = subprocess.run([sys.executable, "-c", join, service.path, str(client.grant)],
                                capture_output=True, text=True, timeout=30)
        assert "is in its cgroup already: one VMM per grant" in direct.stdout, direct
    finally:
        child.kill()
        child.wait()
    # Once that VMM has exited, the next one (a paused VM's resume) may join.
    direct = subprocess.run([sys.executable, "-c", join, service.path, str(client.grant)],
                            capture_output=True, text=True, timeout=30)
    assert '"ok": true' in direct.stdout, direct
    dirs = list(group.dirs)
    client.close()
    assert wait_for(lambda: not any(d.exists() for d in dirs)), dirs


def test_a_check_says_whether_a_start_would_be_refused_and_grants_nothing(service):
    holder, asker = HostClient(service.path), HostClient(service.path)
    assert asker.check(1, 256) is None and not service.admissions.grants
    holder.admit(1, 256, kernel_id="k1")
    assert "has 1 microVM running" in asker.check(1, 256)
    assert len(service.admissions.grants) == 1
    holder.close()
    asker.close()
