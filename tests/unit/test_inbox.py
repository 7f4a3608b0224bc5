"""A Sandbox caller's messages from the guest are bounded in bytes per request:
past the cell's output limit they are dropped and counted, the caller is told,
and the reply and one "idle" still arrive (no VM: a Sandbox fed directly)."""

from __future__ import annotations

from types import SimpleNamespace

from smolvm_guest import wire
from smolvm_guest.wire import Channel
from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.vm.inbox import Inbox
from smolvm_kernel.vm.sandbox import Sandbox
from jupyter_client.session import Session as GuestSession

from smolvm_kernel.vm.session import Session

KEY = b"k" * 64


def _sandbox(limit_mib: int = 1) -> tuple[Sandbox, GuestSession]:
    sb = Sandbox(SandboxConfig(backend="qemu", max_output_mib=limit_mib))
    sb.machine = SimpleNamespace(session=Session(key=KEY, username="smolvm"))   # a VM's key, no VM
    return sb, GuestSession(key=KEY, check_pid=False)


def _feed(sb: Sandbox, guest: GuestSession, chan: Channel, mtype: str, content: dict, parent: dict) -> None:
    msg = guest.msg(mtype, content=content, parent=parent)
    sb._handle_frame(chan, wire.pack_parts(guest.serialize(msg)))


def _drain(q: Inbox) -> list[dict]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_a_flood_for_one_request_is_held_up_to_the_limit_then_counted():
    sb, guest = _sandbox(limit_mib=1)
    parent = {"msg_id": "req-1", "msg_type": "execute_request"}
    q = sb._pending["req-1"] = Inbox(sb.config.max_output_mib * 2**20)
    for _ in range(200):                        # 200 x ~20 KB = 4 MB for a 1 MiB limit
        _feed(sb, guest, Channel.IOPUB, "stream", {"name": "stdout", "text": "x" * 20_000}, parent)
    _feed(sb, guest, Channel.IOPUB, "status", {"execution_state": "idle"}, parent)
    _feed(sb, guest, Channel.IOPUB, "status", {"execution_state": "idle"}, parent)
    _feed(sb, guest, Channel.SHELL, "execute_reply", {"status": "ok"}, parent)
    _feed(sb, guest, Channel.SHELL, "execute_reply", {"status": "ok", "forged": True}, parent)
    got = _drain(q)
    streams = [m for m in got if m["msg_type"] == "stream" and not m["content"]["text"].startswith("[smolvm]")]
    assert 40 <= len(streams) <= 55 and sum(len(m["content"]["text"]) for m in streams) <= 2**20
    notes = [m["content"]["text"] for m in got if m["content"].get("text", "").startswith("[smolvm]")]
    assert len(notes) == 2 and "reached the 1.0 MiB limit" in notes[0]
    assert f"({200 - len(streams) + 1} messages) was dropped" in notes[1]   # and the second idle
    assert [m["msg_type"] for m in got[-3:]] == ["status", "stream", "execute_reply"]
    assert "forged" not in got[-1]["content"]
    assert sum(1 for m in got if m["msg_type"] == "status") == 1


def test_under_the_limit_everything_arrives_in_order():
    sb, guest = _sandbox()
    parent = {"msg_id": "req-2"}
    q = sb._pending["req-2"] = Inbox(2**20)
    for i in range(5):
        _feed(sb, guest, Channel.IOPUB, "stream", {"name": "stdout", "text": f"{i}\n"}, parent)
    _feed(sb, guest, Channel.SHELL, "execute_reply", {"status": "ok"}, parent)
    assert [m["content"].get("text") for m in _drain(q)] == ["0\n", "1\n", "2\n", "3\n", "4\n", None]
