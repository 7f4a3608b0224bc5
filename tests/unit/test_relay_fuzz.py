"""The host side of the guest channel under attack: thousands of random, truncated,
oversized, mis-signed, replayed and cross-VM messages from a fake guest.

Bounded and seeded (reproducible): the relay never raises, whatever it passes
to the frontend is well-formed and signed with the host key, never names a
host comm, and a normal request still completes afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random

from jupyter_client.session import Session

from smolvm_guest.wire import Channel
from smolvm_kernel.jupyter.host_comms import HostComms
from smolvm_kernel.jupyter.relay import DELIM, Relay

HOST_KEY = b"h" * 32
GUEST_KEY = b"g" * 64
OTHER_VM_KEY = b"o" * 64
CASES = 4000
MSG_TYPES = ["stream", "display_data", "execute_result", "update_display_data", "execute_reply", "status",
             "comm_open", "comm_msg", "comm_close", "comm_info_reply", "input_request", "error",
             "clear_output", "kernel_info_reply", "", "x" * 300]


class Guest:
    guest_key = GUEST_KEY

    def __init__(self) -> None:
        self.sent: list = []

    def send_raw(self, chan, parts) -> None:
        self.sent.append((chan, parts))


def _sign(key: bytes, frames: list[bytes]) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for f in frames:
        h.update(f)
    return h.hexdigest().encode()


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**70, 1.5, float("inf")])
    if kind == 2:
        return rng.choice(["", "x", "\u0000", "\udcff", "smolvmhost", "<script>alert(1)</script>",
                           "IPY_MODEL_", "%smolvm stop", "javascript:x"]) * rng.randrange(1, 4)
    if kind in (3, 4, 5):
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if kind in (6, 7):
        return {rng.choice(["msg_id", "data", "state", "comm_id", "text/html", "application/javascript",
                            "payload", "source", "text", "outputs", "_model_module", "method", "states",
                            "execution_state", "prompt", "target_name", "content"]): _random_json(rng, depth + 1)
                for _ in range(rng.randrange(0, 5))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]


def _message(rng: random.Random, parents: list[str], host_ids: list[str]) -> list[bytes]:
    header = {"msg_id": f"g{rng.randrange(10**6)}", "msg_type": rng.choice(MSG_TYPES), "session": "s",
              "username": "u", "date": "2026-01-01T00:00:00Z", "version": "5.3"}
    parent = rng.choice([{"msg_id": rng.choice(parents)}, {}, {"msg_id": ["a"]}, {"msg_id": 7},
                         {"msg_id": {"x": 1}}, {"msg_id": rng.choice(parents), "msg_type": "execute_request"}])
    content = _random_json(rng)
    if not isinstance(content, dict) and rng.random() < 0.8:
        content = {"name": "stdout", "text": str(content), "data": content, "execution_state": content}
    if rng.random() < 0.3:
        content = {"comm_id": rng.choice(host_ids + ["w1"]), "data": _random_json(rng),
                   "target_name": rng.choice(["jupyter.widget", "x"])}
    if rng.random() < 0.2:
        content = {"data": {"text/html": "<img src=x onerror=alert(1)>", "application/javascript": "x()",
                            "image/svg+xml": "<svg onload=alert(1)/>"}, "metadata": {}}
    frames = [json.dumps(header).encode(), json.dumps(parent).encode(), b"{}",
              json.dumps(content, allow_nan=True).encode("utf-8", "surrogatepass")]
    if rng.random() < 0.1:
        frames[rng.randrange(4)] = (b"[" * rng.randrange(1, 6000)) + (b"]" * rng.randrange(0, 6000))
    if rng.random() < 0.1:
        frames[3] = frames[3].replace(b"smolvmhost", b"\\u0073molvmhost")
    frames += [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 20)))
               for _ in range(rng.randrange(0, 3))]
    key = GUEST_KEY if rng.random() < 0.85 else rng.choice([OTHER_VM_KEY, HOST_KEY, b""])
    parts = [b"kernel.fuzz", DELIM, _sign(key, frames[:4]), *frames]
    mutation = rng.random()
    if mutation < 0.05:
        parts = parts[:rng.randrange(len(parts))]                  # truncated
    elif mutation < 0.08:
        parts = [p for p in parts if p != DELIM]                   # no delimiter
    elif mutation < 0.11:
        parts[2] = parts[2][::-1]                                   # bad signature
    elif mutation < 0.13:
        parts.append(b"y" * 70_000)                                 # oversized (limit 64 KiB here)
    return parts


def test_thousands_of_hostile_messages_never_break_the_relay():
    rng = random.Random(20261203)
    sent: list[tuple[str, list[bytes]]] = []
    relay = Relay(Session(key=HOST_KEY, check_pid=False), Guest(), lambda s, f: sent.append((s, f)),
                  max_message_bytes=64 * 1024)
    relay.host_comms = HostComms(lambda *a: None)
    host_ids = [relay.host_comms.create(target_name="jupyter.widget", data={}).comm_id for _ in range(2)]
    frontend = Session(key=HOST_KEY, check_pid=False)
    parents = []
    for i in range(40):                      # requests the guest can answer (or forge answers to)
        msg = frontend.msg("execute_request", content={"code": str(i), "allow_stdin": i % 2 == 0})
        idents, msg_list = frontend.feed_identities(frontend.serialize(msg, ident=[b"client"]))
        relay.forward(Channel.SHELL, "shell", idents, msg_list, msg["header"], allow_stdin=i % 2 == 0)
        parents.append(msg["header"]["msg_id"])
    replayable = []
    for _ in range(CASES):
        chan = rng.choice([Channel.IOPUB, Channel.SHELL, Channel.STDIN, Channel.CONTROL])
        parts = rng.choice(replayable) if replayable and rng.random() < 0.1 else \
            _message(rng, parents, host_ids)
        relay.on_guest(chan, parts)           # must not raise
        if rng.random() < 0.05:
            replayable.append(parts)
    assert relay.dropped > CASES // 10
    assert len(sent) > CASES // 20, "too little was relayed: the generator no longer reaches the relay's paths"
    for sock, frames in sent:
        i = frames.index(DELIM)
        body = frames[i + 2:]
        assert hmac.compare_digest(frames[i + 1], _sign(HOST_KEY, body[:4])), "not signed with K_host"
        header, parent, metadata, content = (json.loads(f) for f in body[:4])
        assert isinstance(header, dict) and isinstance(header.get("msg_type"), str)
        assert isinstance(parent, dict) and isinstance(content, dict) and isinstance(metadata, dict)
        assert sock in ("iopub", "shell", "stdin", "control")
        assert not relay.host_comms.mentioned_in(body[3]) or header["msg_type"] == "stream"
        if header["msg_type"] in ("display_data", "execute_result", "update_display_data"):
            data = content.get("data", {})
            assert "application/javascript" not in data and "image/svg+xml" not in data
            assert "onerror" not in str(data.get("text/html", ""))
        if header["msg_type"] == "input_request":
            assert content["prompt"].startswith("[microVM] ")
    # The relay still works for an honest request.
    sent.clear()
    guest_session = Session(key=GUEST_KEY, check_pid=False)
    msg = frontend.msg("execute_request", content={"code": "1"})
    idents, msg_list = frontend.feed_identities(frontend.serialize(msg, ident=[b"client"]))
    relay.forward(Channel.SHELL, "shell", idents, msg_list, msg["header"])
    reply = guest_session.msg("execute_reply", content={"status": "ok", "execution_count": 1}, parent=msg["header"])
    relay.on_guest(Channel.SHELL, guest_session.serialize(reply))
    assert [s for s, _ in sent] == ["shell"]


def test_a_message_from_another_vm_is_rejected():
    """Keys are per VM (and per restore): a message captured from one VM's
    channel does not verify on another's."""
    sent = []
    relay = Relay(Session(key=HOST_KEY, check_pid=False), Guest(), lambda s, f: sent.append(f))
    frontend = Session(key=HOST_KEY, check_pid=False)
    msg = frontend.msg("execute_request", content={"code": "1"})
    idents, msg_list = frontend.feed_identities(frontend.serialize(msg, ident=[b"client"]))
    relay.forward(Channel.SHELL, "shell", idents, msg_list, msg["header"])
    other_vm = Session(key=OTHER_VM_KEY, check_pid=False)
    captured = other_vm.serialize(other_vm.msg("stream", content={"name": "stdout", "text": "from VM B"},
                                                parent=msg["header"]))
    relay.on_guest(Channel.IOPUB, captured)
    assert sent == [] and relay.dropped == 1
