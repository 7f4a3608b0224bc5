"""What the host does with the guest agent's events and stats answers, whatever
they hold (no VM: a Sandbox that is not started, fed directly). The agent is
root in the guest and guest code cannot reach its channel, but its word is
still checked before the host acts on it or shows it."""

from __future__ import annotations

import queue

import pytest

from smolvm_kernel.vm.guest_news import guest_figures
from smolvm_kernel.vm.sandbox import Sandbox


@pytest.fixture
def sandbox():
    sb = Sandbox(backend="qemu")
    notes: list[str] = []
    sb.on_notice = notes.append
    sb.notes = notes
    return sb


def test_a_limit_event_becomes_one_host_note(sandbox):
    sandbox._on_agent_event({"event": "limit", "what": "processes", "limit": 256, "killed": 191})
    sandbox._on_agent_event({"event": "limit", "what": "memory", "limit": 361, "killed": 3})
    assert sandbox.notes == [
        "[smolvm] this cell reached the VM's limit of 256 processes and threads: it was interrupted "
        "and the 191 processes it started were killed (the kernel and its variables are intact)\n",
        "[smolvm] this cell reached the VM's limit of 361 MiB of memory for the kernel and what it "
        "starts: it was interrupted and the 3 processes it started were killed (the kernel and its "
        "variables are intact)\n"]


def test_a_memory_limit_with_nothing_else_to_kill_does_not_promise_the_kernel_survives(sandbox):
    sandbox._on_agent_event({"event": "limit", "what": "memory", "limit": 361, "killed": 0})
    assert sandbox.notes == ["[smolvm] this cell reached the VM's limit of 361 MiB of memory for the "
                             "kernel and what it starts in the kernel itself: it was interrupted\n"]


@pytest.mark.parametrize("event", [
    {"event": "limit", "what": "<script>", "limit": 1, "killed": 1},
    {"event": "limit", "what": "processes", "limit": "256<b>", "killed": 1},
    {"event": "limit", "what": "processes", "limit": 256, "killed": [1]},
    {"event": "limit"},
    {"event": ["limit"]},
    {"event": "no such event", "text": "x"},
    {},
])
def test_malformed_or_unknown_events_say_nothing_and_never_raise(sandbox, event):
    sandbox._on_agent_event(event)
    assert sandbox.notes == []


def test_without_a_notice_handler_the_note_goes_to_waiting_executions():
    sb = Sandbox(backend="qemu")
    waiting: queue.Queue = queue.Queue()
    sb._pending["m1"] = waiting
    sb._on_agent_event({"event": "dropped", "size": 99_000_000})
    note = waiting.get_nowait()
    assert note["msg_type"] == "stream" and "99000000 bytes was dropped" in note["content"]["text"]


def test_guest_stats_cannot_override_host_fields():
    answer = {"vcpus": 2, "mem_available_kib": 1000, "kernel_ready": True, "backend": "firecracker",
              "accel": "kvm", "pid": 1, "state": "READY", "cpu_percent": "99", "loadavg": True,
              "uptime_s": 3.5, "kernel_rss_kib": None}
    assert guest_figures(answer) == {"vcpus": 2, "mem_available_kib": 1000, "kernel_ready": True,
                                     "uptime_s": 3.5, "kernel_rss_kib": None}
