"""The death matrix, the parts not covered elsewhere: a hung but running VMM,
a guest kernel panic, the guest agent killed. Each on a real VM: the error
names the cause, nothing is left, and a reset gives a working VM.

(Elsewhere: the guest's OOM and the kernel killed in test_kernel.py and
test_vmm_cgroups.py, QEMU SIGKILLed in test_sandbox.py, QEMU SIGSTOPped and the
host kernel's launcher killed in test_kernel.py.)
"""

from __future__ import annotations

import time

import pytest

from smolvm_kernel.errors import GuestDied
from smolvm_kernel.sandbox import HEARTBEAT_IDLE_S, HEARTBEAT_TIMEOUT_S, Sandbox, SandboxState


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stdout(sb: Sandbox, code: str) -> str:
    return "".join(o.content["text"] for o in sb.execute(code, timeout=60) if o.type == "stream")


def _wait_death(sb: Sandbox, limit: float) -> float:
    t = time.monotonic()
    while sb.state != SandboxState.DEAD and time.monotonic() - t < limit:
        time.sleep(0.1)
    return time.monotonic() - t


@pytest.fixture
def vm(image):
    sb = Sandbox(vcpus=2, mem_mib=512, backend="qemu")
    sb.start()
    yield sb
    sb.stop()


def test_a_hung_vmm_is_found_by_the_heartbeat_and_killed(vm):
    """The VMM's vCPUs stopped through its monitor: the process runs, the guest
    says nothing. A waiting cell gets the cause within the heartbeat's bound."""
    from smolvm_kernel.backends.qmp import QMP

    pid = vm.backend.pid
    with QMP(vm.backend.spec.run_dir / "qmp.sock") as qmp:
        qmp.execute("stop")
    t = time.monotonic()
    with pytest.raises(GuestDied, match="stopped responding.*heartbeat") as info:
        list(vm.execute("1 + 1", timeout=120))
    took = time.monotonic() - t
    print(f"hung VMM reported after {took:.1f} s (bound {HEARTBEAT_IDLE_S + 1 + HEARTBEAT_TIMEOUT_S:g} s)")
    assert took <= HEARTBEAT_IDLE_S + 1 + HEARTBEAT_TIMEOUT_S + 3, took
    assert "next cell" in str(info.value)
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the hung VMM was left running"
    vm.reset()
    assert _stdout(vm, "print('fresh')") == "fresh\n"


def test_a_guest_kernel_panic_is_named(vm):
    _fault(vm, "panic")
    took = _wait_death(vm, 30)
    with pytest.raises(GuestDied) as info:
        list(vm.execute("1"))
    text = str(info.value)
    print(f"panic reported after {took:.1f} s: {text.splitlines()[0]}")
    assert "the guest's Linux kernel panicked (sysrq triggered crash)" in text, text
    vm.reset()
    assert _stdout(vm, "print('fresh')") == "fresh\n"


def test_a_killed_guest_agent_is_named(vm):
    _fault(vm, "agent")
    took = _wait_death(vm, 30)
    with pytest.raises(GuestDied) as info:
        list(vm.execute("1"))
    text = str(info.value)
    print(f"agent death reported after {took:.1f} s: {text.splitlines()[0]}")
    assert "the guest's agent died (killed by signal 9)" in text, text
    vm.reset()
    assert _stdout(vm, "print('fresh')") == "fresh\n"


def _fault(vm: Sandbox, what: str) -> None:
    """Send the agent's fault op without waiting for an answer (none comes)."""
    from smolvm_guest import wire
    from smolvm_guest.wire import Channel
    from smolvm_kernel import aio

    body = wire.encode_json({"op": "fault", "id": 999_999, "what": what})
    aio.loop().call_soon_threadsafe(vm._channel.send, Channel.AGENT, body)   # noqa: SLF001
