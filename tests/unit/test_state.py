"""The VM registry and cleanup after a dead owner."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from smolvm_kernel.host.procs import process_start_time, this_process
from smolvm_kernel.host.registry import Registry, VMRecord


def _record(reg: Registry, vm_id: str, owner: int, owner_start: int) -> VMRecord:
    run = reg.new_run_dir(vm_id)
    (run / "scratch.img").write_bytes(b"x")
    rec = VMRecord(vm_id=vm_id, backend="qemu", accel="tcg", profile="base", run_dir=str(run),
                   owner_pid=owner, owner_start=owner_start)
    reg.add(rec)
    return rec


def test_cleanup_kills_and_removes_only_dead_owners(tmp_path):
    reg = Registry(tmp_path)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    vmm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = _record(reg, "dead00000000", owner.pid, process_start_time(owner.pid))
    reg.set_vmm(dead.vm_id, vmm.pid)
    live = _record(reg, "live00000000", *this_process())
    owner.kill()
    owner.wait()
    lines = reg.cleanup()
    assert vmm.wait(5) == -9
    assert not os.path.exists(dead.run_dir) and os.path.exists(live.run_dir)
    assert [r.vm_id for r in reg.list()] == [live.vm_id]
    assert any("killed qemu" in line for line in lines)
    assert reg.cleanup() == []      # a second cleanup finds nothing


def test_pid_reuse_is_not_mistaken_for_a_live_owner(tmp_path):
    reg = Registry(tmp_path)
    pid, start = this_process()
    _record(reg, "reused000000", pid, start + 1)   # same pid, other start time
    reg.cleanup()
    assert reg.list() == []


def test_concurrent_adds_do_not_collide(tmp_path):
    reg = Registry(tmp_path)
    pid, start = this_process()
    errors = []

    def add(i: int) -> None:
        try:
            _record(Registry(tmp_path), f"vm{i:010d}", pid, start)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(reg.list()) == 20


def test_run_dirs_are_private(tmp_path):
    reg = Registry(tmp_path)
    run = reg.new_run_dir("priv00000000")
    assert oct(run.stat().st_mode & 0o777) == "0o700"
    assert oct(reg.root.stat().st_mode & 0o777) == "0o700"
