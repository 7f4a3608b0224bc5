"""Impolite cells on a real VM that the VM survives: a fork bomb, disks and
tmpfs filled, every vCPU spinning. Each time the cell gets a clear error, the
agent keeps answering, and the next cell runs in the same VM.

(The memory bomb ends the kernel, with "out of memory in the VM": test_kernel.py.)
"""

from __future__ import annotations

import time

import pytest

from smolvm_kernel.vm.machine import HEARTBEAT_IDLE_S, HEARTBEAT_TIMEOUT_S
from smolvm_kernel.vm.sandbox import Sandbox, SandboxState


@pytest.fixture(scope="module")
def sandbox(image):
    """A VM of this module's own: what the bombs leave is not another test's business."""
    sb = Sandbox(vcpus=2, mem_mib=512, backend="qemu")
    sb.start()
    yield sb
    sb.stop()


def _run(sb: Sandbox, code: str, timeout: float = 120):
    outs = list(sb.execute(code, timeout=timeout))
    text = "".join(o.content.get("text", "") for o in outs if o.type == "stream")
    errors = [o.content for o in outs if o.type == "error"]
    return text, errors


def _kernel_tasks(sb: Sandbox) -> int:
    text, errors = _run(sb, "print(open('/sys/fs/cgroup/kernel/pids.current').read())")
    assert not errors, errors
    return int(text)


def test_a_fork_bomb_stops_at_the_limit_and_its_processes_go(sandbox):
    vm_id = sandbox.vm_id
    before = _kernel_tasks(sandbox)
    text, errors = _run(sandbox, "import os\nwhile True:\n    os.fork()")
    # Interrupted by the agent, unless its own fork met the limit first; which
    # limit comes first (processes, or memory for the bomb's copies) varies.
    assert [e["ename"] for e in errors] in (["KeyboardInterrupt"], ["BlockingIOError"]), errors
    assert "reached the VM's limit of" in text and "were killed" in text, text
    # The bomb's processes are gone, the kernel (and its state) is not.
    assert sandbox.vm_id == vm_id and sandbox.state == SandboxState.READY
    after = _kernel_tasks(sandbox)
    print(f"kernel's tasks before the bomb {before}, after {after}")
    assert after <= before + 2, (before, after)
    text, errors = _run(sandbox, "import subprocess; print(subprocess.run(['echo', 'forks again'], "
                                 "capture_output=True, text=True).stdout)")
    assert not errors and "forks again" in text


def test_filling_the_disks_and_tmpfs_gives_enospc_and_the_vm_goes_on(sandbox):
    vm_id = sandbox.vm_id
    for path in ("/home/user/fill", "/tmp/fill", "/dev/shm/fill"):
        text, errors = _run(sandbox, f"""
import errno, os
try:
    with open({path!r}, 'wb') as f:
        while True:
            f.write(b'x' * 2**20)
except OSError as exc:
    print('full', errno.errorcode.get(exc.errno), os.path.getsize({path!r}) >> 20)
finally:
    os.unlink({path!r})
""")
        assert not errors, errors
        print(path, text.strip())
        assert text.startswith("full ENOSPC"), (path, text)
    assert sandbox.vm_id == vm_id and sandbox.state == SandboxState.READY
    text, errors = _run(sandbox, "open('/tmp/after', 'w').write('ok'); print(open('/tmp/after').read())")
    assert not errors and text.strip() == "ok"


def test_every_vcpu_spinning_leaves_the_agent_answering(sandbox):
    """Spinners in the kernel's group (a loop per vCPU, and then some) for
    longer than the heartbeat's timeout: the agent, outside that group, still
    answers each heartbeat and the VM is not declared dead."""
    vm_id = sandbox.vm_id
    spin_s = HEARTBEAT_IDLE_S + HEARTBEAT_TIMEOUT_S + 4
    text, errors = _run(sandbox, f"""
import os, signal, time
pids = []
for _ in range(16):
    pid = os.fork()
    if pid == 0:
        while True:
            pass
    pids.append(pid)
time.sleep({spin_s})
for pid in pids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print('spun', len(pids))
""")
    assert not errors and "spun 16" in text, (text, errors)
    t = time.monotonic()
    assert sandbox.agent_request("ping", timeout=10)["ok"]
    print(f"agent ping after {spin_s:g} s of 16 spinners: {time.monotonic() - t:.2f} s")
    assert sandbox.vm_id == vm_id and sandbox.state == SandboxState.READY
