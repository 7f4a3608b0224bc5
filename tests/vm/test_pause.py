"""Idle VMs paused to disk and resumed on their next use (pause.py), on real VMs:
the VMM goes and its memory with it, the guest's state survives, the resume
is told, a busy VM is never paused, and a paused VM's stop leaves nothing."""

from __future__ import annotations

import time
from pathlib import Path

from smolvm_kernel.host.registry import Registry
from smolvm_kernel.vm.pause import STATE_FILE
from smolvm_kernel.vm.sandbox import SandboxState


def _wait_paused(sb, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (sb.state == SandboxState.PAUSED and sb.pauser.paused):
        assert time.monotonic() < deadline, f"the idle VM was not paused ({sb.state}, {sb.pause_note!r})"
        time.sleep(0.2)


def test_an_idle_vm_is_paused_to_disk_and_resumes_with_its_state(sandbox_factory):
    sb = sandbox_factory(pause_after=2)
    sb.start()
    run_dir = Path(sb.backend.spec.run_dir)
    outs = list(sb.execute("import os\nx = 41\nwith open('/tmp/mark', 'w') as fh: fh.write('kept')\nos.getpid()"))
    kernel_pid = outs[-1].text
    vmm_pid = sb.backend.pid
    _wait_paused(sb)
    # The VMM is gone, and with it the VM's memory; its folder and record stay.
    deadline = time.monotonic() + 5
    while Path(f"/proc/{vmm_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{vmm_pid}").exists()
    assert (run_dir / STATE_FILE).stat().st_size == sb.pauser.state_bytes > 0
    assert sb.vm_id in {r.vm_id for r in Registry().list()}
    st = sb.stats()          # the panel's figures do not wake it
    assert st["state"] == "paused" and st["vmm_rss_kib"] is None and sb.pauser.paused
    sb.interrupt()           # nothing runs in it: a no-op, not a resume
    assert sb.pauser.paused

    outs = list(sb.execute("x + 1, open('/tmp/mark').read(), os.getpid()"))
    assert "resumed in" in outs[0].text and outs[0].name == "stderr", outs
    assert outs[-1].text == f"(42, 'kept', {kernel_pid})"
    assert sb.state == SandboxState.READY and sb.backend.pid != vmm_pid
    assert not (run_dir / STATE_FILE).exists()
    # The guest's clock was set on the resume.
    (clock,) = [o.text for o in sb.execute("import time; time.time()")]
    assert abs(float(clock) - time.time()) < 5
    print(f"paused {sb.pauser.state_bytes >> 20} MiB in {sb.pauser.last_pause_s:.2f} s, "
          f"resumed in {sb.pauser.last_resume_s:.2f} s")

    # Paused again, then stopped while paused: nothing of it is left.
    _wait_paused(sb)
    vm_id = sb.vm_id
    sb.stop()
    assert not run_dir.exists()
    assert vm_id not in {r.vm_id for r in Registry().list()}
    mine = [e for e in sb.audit.read() if e.get("vm_id") == vm_id]
    assert [e["event"] for e in mine] == ["start", "pause", "resume", "pause", "stop"], mine
    pause = next(e for e in mine if e["event"] == "pause")
    assert pause["state_bytes"] > 0 and pause["idle_s"] >= 2


def test_a_busy_vm_is_not_paused(sandbox_factory):
    sb = sandbox_factory(pause_after=1)
    sb.start()
    # A cell longer than pause_after, silent: the VM has a request in it.
    outs = list(sb.execute("import time; time.sleep(5); 'done'"))
    assert outs[-1].text == "'done'" and sb.pauser.pauses == 0
    sb.stop()


def test_a_kernel_resumes_its_paused_vm_on_the_next_cell(kernelspec, notebook_dir, monkeypatch):
    from jupyter_client.manager import start_new_kernel

    monkeypatch.setenv("SMOLVM_PAUSE_AFTER", "2")
    km, kc = start_new_kernel(kernel_name=kernelspec, startup_timeout=60, cwd=str(notebook_dir))
    try:
        kc.execute_interactive("y = [1, 2, 3]", timeout=120)
        before = [r for r in Registry().list() if r.owner_pid == km.provisioner.process.pid]
        (vm,) = before
        deadline = time.monotonic() + 60
        while Path(f"/proc/{vm.vmm_pid}").exists():
            assert time.monotonic() < deadline, "the kernel's idle VM was not paused"
            time.sleep(0.5)
        assert (Path(vm.run_dir) / STATE_FILE).exists()
        outs = []
        reply = kc.execute_interactive("sum(y)", timeout=60, output_hook=outs.append)
        assert reply["content"]["status"] == "ok"
        texts = [m["content"].get("text") or m["content"].get("data", {}).get("text/plain") for m in outs
                 if m["msg_type"] in ("stream", "execute_result")]
        assert any(t and "resumed in" in t for t in texts), texts
        assert "6" in texts, texts
        (after,) = [r for r in Registry().list() if r.owner_pid == km.provisioner.process.pid]
        assert after.vm_id == vm.vm_id and after.vmm_pid != vm.vmm_pid
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_a_cold_booted_vm_pauses_and_resumes_too(sandbox_factory):
    """Not forked from a snapshot (none for its shape, or a restore that fell
    back to a cold boot): its RAM is QEMU's own, and it resumes all the same."""
    sb = sandbox_factory(pause_after=2, snapshot="off")
    sb.start()
    assert sb.started_from == "cold boot"
    assert sb.can_resize_live(384)      # its RAM is its own: the balloon may take some back
    list(sb.execute("z = 'cold'"))
    _wait_paused(sb)
    outs = list(sb.execute("z"))
    assert "resumed in" in outs[0].text and outs[-1].text == "'cold'", outs
    sb.config = sb.config.changed(pause_after=0)         # no pause while the balloon works
    mem = "print(int(open('/proc/meminfo').readline().split()[1]) // 1024)"
    before = int(list(sb.execute(mem))[-1].text)
    assert sb.set_memory(384) == 384                      # resumed: anonymous RAM, live balloon
    assert before - int(list(sb.execute(mem))[-1].text) == 128
    assert list(sb.execute("z"))[-1].text == "'cold'"
    sb.stop()
