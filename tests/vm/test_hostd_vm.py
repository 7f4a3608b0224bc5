"""The host's admission service with real VMs: a user's second VM over the
quota is refused with the reason, the first one's stop gives its place back,
and the host's audit log has it all, written by the service: the kernels'
events marked as theirs, the service's own also in a log no user writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from smolvm_kernel.classroom.hostd import HostService
from smolvm_kernel.host import policy
from smolvm_kernel.host.admission import AdmissionRefused
from smolvm_kernel.host.audit import AuditLog
from smolvm_kernel.vm.sandbox import Sandbox

from support import loop_thread, remove_cgroup_parent, wait_for


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the policy file must be root's: run as root")


@pytest.fixture
def host(tmp_path, monkeypatch, image):
    sock, audit = tmp_path / "hostd.sock", tmp_path / "audit.jsonl"
    path = tmp_path / "policy.toml"
    path.write_text(f'hostd = "{sock}"\naudit_log = "{audit}"\nmax_vms_per_user = 1\n')
    monkeypatch.setattr(policy, "POLICY_FILE", str(tmp_path / "no-etc-policy.toml"))
    monkeypatch.setenv("SMOLVM_POLICY_FILE", str(path))
    svc = HostService(str(sock), policy.load(), audit=AuditLog(audit),
                      cgroup_parent=f"smolvm-hostd-test-{os.getpid()}")     # not the host's own folder
    with loop_thread() as run:
        run(svc.start())
        yield svc
        run(svc.close())
    remove_cgroup_parent(svc.cgroup_parent)


def test_a_second_vm_over_the_users_quota_is_refused_until_the_first_stops(host):
    first, second = Sandbox(backend="qemu"), Sandbox(backend="qemu")
    first.audit_context["kernel_id"] = "first"
    second.audit_context["kernel_id"] = "second"
    try:
        first.start()
        with pytest.raises(AdmissionRefused, match="the host refused to start a microVM: .* has 1 microVM "
                                                   "running, the most the instructor's policy"):
            second.start()
        listing = subprocess.run([sys.executable, "-m", "smolvm_kernel.cli", "ls", "--all", "--socket", host.path],
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0 and "first" in listing.stdout, listing.stderr
        first.stop()
        wait_for(lambda: not host.admissions.grants, 10, interval=0.05)
        second.start()
        assert "".join(o.text for o in second.execute("print('admitted')") if o.type == "stream") == "admitted\n"
    finally:
        first.stop()
        second.stop()
    # The service sees the closed connection a moment later.
    wait_for(lambda: not host.admissions.grants, 10, interval=0.05)
    events = [(e["event"], e.get("kernel_id")) for e in host.audit.read()]
    print(events)
    assert events[:3] == [("admit", "first"), ("start", "first"), ("refused", "second")]
    assert ("stop", "first") in events and ("admit", "second") in events and ("start", "second") in events
    assert events.index(("stop", "first")) < events.index(("admit", "second"))
    assert events[-1][0] == "release"
    assert all(e["by"] == ("hostd" if e["event"] in ("admit", "release") else "user") for e in host.audit.read()
               if e["event"] != "refused")
    own = [(e["event"], e.get("kernel_id"), e["by"]) for e in host.own_audit.read()]
    assert own[:2] == [("admit", "first", "hostd"), ("refused", "second", "hostd")], own
    assert not [e for e in own if e[0] in ("start", "stop")]


def test_a_cold_boot_after_a_failed_restore_keeps_its_grant(host, monkeypatch):
    """A snapshot restore that fails falls back to a cold boot, and that boot is
    still under the grant (the fallback used to give the grant back first, so
    a student who broke their own snapshot cache booted with no grant at all)."""
    from smolvm_kernel.errors import SmolVMError

    real_launch = Sandbox._launch

    async def failing_restore(self, plan, restore):
        if restore is not None:
            raise SmolVMError("a restore made to fail by the test")
        return await real_launch(self, plan, restore)

    monkeypatch.setattr(Sandbox, "_launch", failing_restore)
    first, second = Sandbox(backend="qemu"), Sandbox(backend="qemu")
    # The shared ready snapshot is not this test's to drop.
    first._snapshots.drop = second._snapshots.drop = lambda *a, **k: None
    try:
        first.start()
        assert first.started_from == "cold boot"
        assert [g.uid for g in host.admissions.grants.values()] == [os.getuid()]
        with pytest.raises(AdmissionRefused, match="has 1 microVM running"):
            second.start()
    finally:
        first.stop()
        second.stop()
