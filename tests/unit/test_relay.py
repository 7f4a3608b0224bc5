"""The relay between frontend and guest, with an in-process fake guest kernel."""

from __future__ import annotations

import json

import pytest
from jupyter_client.session import Session

from smolvm_guest.wire import Channel
from smolvm_kernel.errors import GuestDied
from smolvm_kernel.jupyter.relay import DELIM, Relay

HOST_KEY = b"host-key-never-seen-by-the-guest"
GUEST_KEY = b"g" * 64


class FakeGuest:
    """Answers execute_request like ipykernel would, signing with K_guest."""

    def __init__(self) -> None:
        self.guest_key = GUEST_KEY
        self.session = Session(key=GUEST_KEY, check_pid=False)
        self.received: list[tuple[Channel, list[bytes]]] = []
        self.relay: Relay | None = None
        self.extra: list[tuple[Channel, str, dict]] = []

    def send_raw(self, chan: Channel, parts: list[bytes]) -> None:
        self.received.append((chan, parts))
        _, msg_list = self.session.feed_identities(parts)
        msg = self.session.deserialize(msg_list)      # raises if not signed with K_guest
        if msg["msg_type"] == "execute_request":
            parent = msg["header"]
            self.emit(Channel.IOPUB, "status", {"execution_state": "busy"}, parent)
            for chan2, mtype, content in self.extra:
                self.emit(chan2, mtype, content, parent)
            self.emit(Channel.IOPUB, "stream", {"name": "stdout", "text": "hi\n"}, parent)
            self.emit(Channel.IOPUB, "status", {"execution_state": "idle"}, parent)
            self.emit(Channel.SHELL, "execute_reply", {"status": "ok", "execution_count": 1}, parent)

    def emit(self, chan: Channel, mtype: str, content: dict, parent: dict, key: bytes | None = None) -> None:
        session = self.session if key is None else Session(key=key, check_pid=False)
        msg = session.msg(mtype, content=content, parent=parent)
        ident = [b"kernel.x." + mtype.encode()] if chan == Channel.IOPUB else []
        self.relay.on_guest(chan, session.serialize(msg, ident=ident))


@pytest.fixture
def setup():
    host = Session(key=HOST_KEY, check_pid=False)
    frontend = Session(key=HOST_KEY, check_pid=False)
    guest = FakeGuest()
    sent: list[tuple[str, list[bytes]]] = []
    relay = Relay(host, guest, lambda sock, frames: sent.append((sock, frames)), max_message_bytes=4096)
    guest.relay = relay
    return relay, guest, frontend, sent


def frontend_request(frontend: Session, relay: Relay, mtype: str = "execute_request",
                     content: dict | None = None, host_busy: bool = False):
    msg = frontend.msg(mtype, content=content or {"code": "print('hi')"})
    frames = frontend.serialize(msg, ident=[b"client-ident"])
    idents, msg_list = frontend.feed_identities(frames)
    relay.forward(Channel.SHELL, "shell", idents, msg_list, msg["header"], host_busy,
                  allow_stdin=msg["content"].get("allow_stdin") is True)
    return msg, msg_list


def decode(frontend: Session, sent):
    """What the frontend sees: every frame verified with K_host."""
    out = []
    for sock, frames in sent:
        idents, msg_list = frontend.feed_identities(frames)
        out.append((sock, idents, frontend.deserialize(msg_list)))
    return out


def test_headers_and_ids_pass_through_untouched_and_are_resigned(setup):
    relay, guest, frontend, sent = setup
    msg, msg_list = frontend_request(frontend, relay)
    chan, parts = guest.received[0]
    assert chan == Channel.SHELL
    i = parts.index(DELIM)
    assert parts[i + 2:] == msg_list[1:]               # the frontend's exact bytes
    assert parts[i + 1] != msg_list[0]                  # but signed with K_guest, not K_host
    got = decode(frontend, sent)
    assert [m["msg_type"] for _, _, m in got] == ["status", "stream", "status", "execute_reply"]
    assert all(m["parent_header"]["msg_id"] == msg["header"]["msg_id"] for _, _, m in got)
    reply_sock, reply_idents, _ = got[-1]
    assert reply_sock == "shell" and reply_idents == [b"client-ident"]
    assert got[0][0] == "iopub" and got[0][1] == [b"kernel.x.status"]


def test_guest_never_sees_the_host_key(setup):
    relay, guest, frontend, sent = setup
    frontend_request(frontend, relay)
    for _, parts in guest.received:
        assert all(HOST_KEY not in p for p in parts)


def test_message_signed_with_another_key_is_dropped(setup):
    relay, guest, frontend, sent = setup
    msg, _ = frontend_request(frontend, relay)
    sent.clear()
    guest.emit(Channel.IOPUB, "stream", {"name": "stdout", "text": "forged"}, msg["header"], key=HOST_KEY)
    guest.emit(Channel.IOPUB, "stream", {"name": "stdout", "text": "forged"}, msg["header"], key=b"")
    assert sent == [] and relay.dropped == 2


def test_forged_host_comm_messages_are_dropped(setup):
    from smolvm_kernel.jupyter.host_comms import HostComms

    relay, guest, frontend, sent = setup
    published = []
    relay.host_comms = HostComms(lambda *a: published.append(a))
    panel = relay.host_comms.create(target_name="jupyter.widget", data={})
    assert published and published[0][1]["comm_id"] == panel.comm_id
    msg, _ = frontend_request(frontend, relay)
    sent.clear()
    pid = panel.comm_id
    # naming the panel's comm, redisplaying it, restating it through a control comm
    guest.emit(Channel.IOPUB, "comm_msg", {"comm_id": pid, "data": {"method": "update"}}, msg["header"])
    guest.emit(Channel.IOPUB, "comm_close", {"comm_id": pid, "data": {}}, msg["header"])
    guest.emit(Channel.IOPUB, "display_data", {"data": {"application/vnd.jupyter.widget-view+json":
                                                        {"model_id": pid}}, "metadata": {}}, msg["header"])
    guest.emit(Channel.IOPUB, "comm_msg", {"comm_id": "ctl", "data": {"method": "update_states",
                                                                     "states": {pid: {}}}}, msg["header"])
    # a guest widget, and a guest print of the id (harmless text), pass
    guest.emit(Channel.IOPUB, "comm_open", {"comm_id": "w1", "target_name": "jupyter.widget", "data": {}},
               msg["header"])
    guest.emit(Channel.IOPUB, "stream", {"name": "stdout", "text": pid}, msg["header"])
    # an id that merely looks like a host id but is not ours passes too
    other = "smolvmhost" + "0" * 32
    guest.emit(Channel.IOPUB, "comm_open", {"comm_id": other, "target_name": "jupyter.widget", "data": {}},
               msg["header"])
    got = decode(frontend, sent)
    assert [m["header"]["msg_type"] for _, _, m in got] == ["comm_open", "stream", "comm_open"]
    assert relay.dropped == 4


def test_oversized_guest_message_is_dropped_with_a_warning(setup):
    relay, guest, frontend, sent = setup
    guest.extra = [(Channel.IOPUB, "stream", {"name": "stdout", "text": "x" * 10000})]
    frontend_request(frontend, relay)
    got = decode(frontend, sent)
    texts = [m["content"].get("text", "") for _, _, m in got if m["msg_type"] == "stream"]
    assert "x" * 10000 not in texts
    assert any("was dropped" in t and "4096" in t for t in texts)
    assert relay.dropped == 1


def test_one_busy_idle_pair_when_the_host_said_busy_first(setup):
    """While booting the host announces busy; the guest's own busy is then dropped."""
    relay, guest, frontend, sent = setup
    frontend_request(frontend, relay, host_busy=True)
    got = decode(frontend, sent)
    states = [m["content"]["execution_state"] for _, _, m in got if m["msg_type"] == "status"]
    assert states == ["idle"]
    iopub_types = [m["msg_type"] for s, _, m in got if s == "iopub"]
    assert iopub_types[-1] == "status"       # idle only after the last output


def test_input_request_goes_to_the_requesting_client(setup):
    relay, guest, frontend, sent = setup
    guest.extra = [(Channel.STDIN, "input_request", {"prompt": "name? ", "password": False})]
    frontend_request(frontend, relay, content={"code": "input()", "allow_stdin": True})
    got = decode(frontend, sent)
    stdin = [(s, i, m["content"]["prompt"]) for s, i, m in got if m["msg_type"] == "input_request"]
    assert stdin == [("stdin", [b"client-ident"], "[microVM] name? ")]


def test_input_request_without_allow_stdin_is_dropped(setup):
    relay, guest, frontend, sent = setup
    guest.extra = [(Channel.STDIN, "input_request", {"prompt": "Password: ", "password": True})]
    frontend_request(frontend, relay, content={"code": "input()", "allow_stdin": False})
    got = decode(frontend, sent)
    assert not [m for _, _, m in got if m["msg_type"] == "input_request"] and relay.dropped == 1


def test_replies_to_unknown_requests_are_dropped(setup):
    relay, guest, frontend, sent = setup
    guest.emit(Channel.SHELL, "execute_reply", {"status": "ok"}, {"msg_id": "never-sent"})
    assert sent == [] and relay.dropped == 1


def test_garbage_from_the_guest_is_dropped(setup):
    relay, guest, frontend, sent = setup
    relay.on_guest(Channel.IOPUB, [b"no delimiter"])
    relay.on_guest(Channel.IOPUB, [DELIM, b"sig"])
    sig_ok = Session(key=GUEST_KEY, check_pid=False).sign([b"{not json", b"{}", b"{}", b"{}"])
    relay.on_guest(Channel.IOPUB, [DELIM, sig_ok, b"{not json", b"{}", b"{}", b"{}"])
    assert sent == [] and relay.dropped == 3


def _signed(frames: list[bytes]) -> list[bytes]:
    """A message any guest code can make: it can read K_guest."""
    sig = Session(key=GUEST_KEY, check_pid=False).sign(frames[:4])
    return [b"kernel.x", DELIM, sig, *frames]


@pytest.mark.parametrize("header, parent, content", [
    (b'{"msg_type": "stream", "msg_id": "x"}', b'{"msg_id": ["a", "list"]}', b'{"text": "x"}'),
    (b'{"msg_type": "stream"}', b'{"msg_id": {"a": 1}}', b'{}'),
    (b'{"msg_type": "stream"}', b"[" * 5000 + b"]" * 5000, b"{}"),
    (b"[" * 100000 + b"]" * 100000, b"{}", b"{}"),
    (b'{"msg_type": ["status"]}', b'{"msg_id": "x"}', b"{}"),
    (b'"a string"', b"{}", b"{}"),
    (b'{"msg_type": "status"}', b"7", b"{}"),
    (b'{"msg_type": "status"}', b"{}", b'{"execution_state": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    (b'{"msg_type": "comm_info_reply"}', b"{}", b'{"comms": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    (b'{"msg_type": "execute_reply"}', b'{"msg_id": 12}', b'{"execution_count": "many"}'),
])
@pytest.mark.parametrize("chan", [Channel.IOPUB, Channel.SHELL, Channel.STDIN, Channel.CONTROL])
def test_correctly_signed_malformed_messages_never_raise(setup, chan, header, parent, content):
    """Confirmed on a real VM before: a list as parent msg_id, or a header nested
    5,000 deep, raised out of the relay and ended the host kernel."""
    from smolvm_kernel.jupyter.host_comms import HostComms

    relay, guest, frontend, sent = setup
    relay.host_comms = HostComms(lambda *a: None)
    relay.host_comms.create(target_name="jupyter.widget", data={})
    frontend_request(frontend, relay)
    sent.clear()
    relay.on_guest(chan, _signed([header, parent, b"{}", content]))
    check = Session(key=HOST_KEY, check_pid=False)
    for _, frames in sent:     # whatever passed is well-formed and signed with K_host
        check.deserialize(check.feed_identities(frames)[1])
    frontend_request(frontend, relay)      # and the relay still works
    assert any(m["msg_type"] == "execute_reply" for _, _, m in decode(frontend, sent))


def test_host_comm_named_through_a_json_escape_is_dropped(setup):
    from smolvm_kernel.jupyter.host_comms import HostComms

    relay, guest, frontend, sent = setup
    relay.host_comms = HostComms(lambda *a: None)
    pid = relay.host_comms.create(target_name="jupyter.widget", data={}).comm_id
    msg, _ = frontend_request(frontend, relay)
    sent.clear()
    escaped = "\\u0073" + pid[1:]
    header = json.dumps({"msg_type": "comm_msg", "msg_id": "m"}).encode()
    parent = json.dumps({"msg_id": msg["header"]["msg_id"]}).encode()
    for content in (f'{{"comm_id": "{escaped}", "data": {{"method": "update"}}}}',
                    f'{{"comm_id": "w", "data": {{"state": {{"x": "IPY_MODEL_{escaped}"}}}}}}'):
        assert json.loads(content.encode())     # the frontend would decode it to the panel's id
        relay.on_guest(Channel.IOPUB, _signed([header, parent, b"{}", content.encode()]))
    meta = f'{{"{escaped}": 1}}'.encode()
    relay.on_guest(Channel.IOPUB, _signed([json.dumps({"msg_type": "display_data"}).encode(), parent, meta,
                                           b'{"data": {}, "metadata": {}}']))
    assert sent == [] and relay.dropped == 3


def test_backlog_waits_for_the_guest(setup):
    relay, guest, frontend, sent = setup
    ready = False
    relay.is_ready = lambda: ready
    frontend_request(frontend, relay)
    frontend_request(frontend, relay, "complete_request", {"code": "o", "cursor_pos": 1})
    assert guest.received == []
    ready = True
    relay.flush_backlog()
    assert [json.loads(p[p.index(DELIM) + 2])["msg_type"] for _, p in guest.received] == \
        ["execute_request", "complete_request"]


def test_death_ends_open_requests_with_error_then_idle(setup):
    relay, guest, frontend, sent = setup
    guest.send_raw = lambda chan, parts: None          # the guest never answers
    msg, _ = frontend_request(frontend, relay)
    relay.fail_inflight(GuestDied("the microVM exited (status -9)"))
    got = decode(frontend, sent)
    assert [m["msg_type"] for _, _, m in got] == ["error", "execute_reply", "status"]
    assert "microVM exited" in got[0][2]["content"]["evalue"]
    assert got[1][2]["content"]["status"] == "error"
    assert got[2][2]["content"]["execution_state"] == "idle"
    assert relay.inflight == {}


def test_overdue_counts_from_when_the_guest_got_the_request(setup):
    import time

    relay, guest, frontend, sent = setup
    guest.send_raw = lambda chan, parts: None          # keep it running
    ready = False
    relay.is_ready = lambda: ready
    msg, _ = frontend_request(frontend, relay)
    now = time.monotonic()
    assert relay.overdue(1.0, now + 100) == []          # still in the backlog: no clock yet
    ready = True
    relay.flush_backlog()
    (req,) = relay.inflight.values()
    assert relay.overdue(1.0, req.sent_at + 0.5) == []
    assert relay.overdue(1.0, req.sent_at + 2) == [req]


def test_send_failure_ends_the_request_instead_of_crashing(setup):
    from smolvm_kernel.errors import SandboxStopped

    relay, guest, frontend, sent = setup

    def gone(chan, parts):
        raise SandboxStopped()

    guest.send_raw = gone
    frontend_request(frontend, relay)
    got = decode(frontend, sent)
    assert [m["msg_type"] for _, _, m in got] == ["error", "execute_reply", "status"]


def test_output_policy_applies_to_what_the_guest_displays(setup):
    relay, guest, frontend, sent = setup
    guest.extra = [
        (Channel.IOPUB, "display_data", {"data": {"application/javascript": "fetch('/api/contents')",
                                                  "text/plain": "<Javascript object>"}, "metadata": {}}),
        (Channel.IOPUB, "display_data", {"data": {"text/html": "<img src=x onerror=alert(1)><b>t</b>",
                                                  "application/vnd.bokehjs_exec.v0+json": "",
                                                  "text/plain": "t"}, "metadata": {}}),
        (Channel.IOPUB, "comm_open", {"comm_id": "w9", "target_name": "jupyter.widget", "data": {"state": {
            "_model_module": "evil-cdn-module", "_view_module": "evil-cdn-module"}}}),
    ]
    frontend_request(frontend, relay)
    got = [m for _, _, m in decode(frontend, sent)]
    displays = [m["content"]["data"] for m in got if m["msg_type"] == "display_data"]
    assert "application/javascript" not in displays[0] and "blocked" in displays[0]["text/plain"]
    assert displays[1] == {"text/html": "<img><b>t</b>", "text/plain": "t"}
    assert not [m for m in got if m["msg_type"] == "comm_open"]
    notes = [m["content"]["text"] for m in got if m["msg_type"] == "stream" and "[smolvm]" in m["content"]["text"]]
    assert any("bokehjs_exec" in n for n in notes) and any("evil-cdn-module" in n for n in notes)
    assert got[-1]["msg_type"] == "execute_reply"


def test_trusted_policy_passes_outputs_unchanged(setup):
    from smolvm_kernel.jupyter.output_policy import OutputPolicy

    relay, guest, frontend, sent = setup
    relay.policy = OutputPolicy("trusted")
    bundle = {"application/javascript": "x()", "text/plain": "js"}
    guest.extra = [(Channel.IOPUB, "display_data", {"data": bundle, "metadata": {}})]
    frontend_request(frontend, relay)
    assert [m["content"]["data"] for _, _, m in decode(frontend, sent) if m["msg_type"] == "display_data"] \
        == [bundle]


def test_a_cell_sends_at_most_its_output_limit_and_says_what_was_dropped(setup):
    relay, guest, frontend, sent = setup
    relay.max_cell_output = 3000
    guest.extra = [(Channel.IOPUB, "stream", {"name": "stdout", "text": f"{i:04d}" + "x" * 400})
                   for i in range(40)]
    frontend_request(frontend, relay)
    got = [m for _, _, m in decode(frontend, sent)]
    texts = [m["content"]["text"] for m in got if m["msg_type"] == "stream"]
    relayed = [t for t in texts if not t.startswith("[smolvm]")]
    assert 0 < len(relayed) < 10 and sum(len(t) for t in relayed) < 3000
    notes = [t for t in texts if t.startswith("[smolvm]")]
    assert "reached the 3 KiB limit" in notes[0]
    assert "messages) was dropped" in notes[1]
    # the note of what was dropped comes before the reply; the reply and idle still come
    types = [m["msg_type"] for m in got]
    assert types.index("execute_reply") > max(i for i, m in enumerate(got) if m["msg_type"] == "stream")
    assert types[-1] == "execute_reply" and "status" in types


def test_iopub_that_names_no_running_cell_shares_one_budget_until_the_next_cell(setup):
    """A background thread's output, or outputs with a forged parent (any id the
    guest likes), cannot queue more than one cell's limit for the frontend; the
    next execute_request renews it. Every IOPub type counts, not only streams."""
    relay, guest, frontend, sent = setup
    relay.max_cell_output = 3000
    msg, _ = frontend_request(frontend, relay)
    sent.clear()
    for i in range(30):
        forged = {"msg_id": f"forged-{i}", "msg_type": "execute_request"}
        guest.emit(Channel.IOPUB, "error" if i % 2 else "comm_msg",
                   {"ename": "E", "evalue": "x" * 300, "traceback": []} if i % 2 else
                   {"comm_id": "c", "data": {"x": "y" * 300}}, forged)
    guest.emit(Channel.IOPUB, "status", {"execution_state": "idle"}, {"msg_id": "forged-0"})
    got = [m for _, _, m in decode(frontend, sent)]
    relayed = [m for m in got if m["msg_type"] in ("error", "comm_msg")]
    assert 0 < len(relayed) < 10
    notes = [m for m in got if m["msg_type"] == "stream"]
    assert len(notes) == 1 and "belongs to no running cell" in notes[0]["content"]["text"]
    assert notes[0]["parent_header"]["msg_id"] == msg["header"]["msg_id"]   # the host's, not the guest's
    assert got[-1]["msg_type"] == "status"       # a small status always passes
    assert relay.background.dropped_msgs == 30 - len(relayed)

    sent.clear()
    frontend_request(frontend, relay)            # a new cell: a new budget for the background
    guest.emit(Channel.IOPUB, "stream", {"name": "stdout", "text": "late\n"}, {"msg_id": "gone"})
    assert any(m["msg_type"] == "stream" and m["content"]["text"] == "late\n"
               for _, _, m in decode(frontend, sent))


def test_a_large_status_message_counts_like_any_output(setup):
    relay, guest, frontend, sent = setup
    relay.max_cell_output, relay.max_message_bytes = 12_000, 100_000
    msg, _ = frontend_request(frontend, relay)
    sent.clear()
    for _ in range(10):
        guest.emit(Channel.IOPUB, "status", {"execution_state": "busy", "pad": "p" * 5000}, msg["header"])
    statuses = [m for _, _, m in decode(frontend, sent) if m["msg_type"] == "status"]
    assert 0 < len(statuses) < 3


def test_the_dropped_note_comes_before_idle_even_when_idle_comes_before_the_reply(setup):
    """The agent reads IOPub and shell apart: a cell's "idle" can reach the host
    before its reply (the fake guest sends them in that order). A frontend stops
    listening at "idle", so the note of what was dropped goes out before it, once."""
    relay, guest, frontend, sent = setup
    relay.max_cell_output = 3000
    guest.extra = [(Channel.IOPUB, "stream", {"name": "stdout", "text": "x" * 400}) for _ in range(20)]
    frontend_request(frontend, relay)
    got = [m for _, _, m in decode(frontend, sent)]
    types = [m["msg_type"] for m in got]
    told = [i for i, m in enumerate(got) if "was dropped" in m["content"].get("text", "")]
    idle = max(i for i, m in enumerate(got) if m["msg_type"] == "status"
               and m["content"]["execution_state"] == "idle")
    assert len(told) == 1 and told[0] < idle < types.index("execute_reply")
