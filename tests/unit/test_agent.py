"""The guest agent's logic, driven by the host's GuestChannel over a socketpair."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import threading
import time
import types

import pytest

from smolvm_guest import wire
import smolvm_guest.agent as agent_mod
import smolvm_guest.kernel as guest_kernel
import smolvm_guest.link as guest_link
from smolvm_guest.wire import Channel
from smolvm_kernel.channel.stream import GuestChannel
from smolvm_kernel.errors import ProtocolError, ProtocolMismatch


class SocketLink:
    reconnects_by_eof = False
    connected = True

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes:
        return self.sock.recv(1 << 16)

    def write_all(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hang_up(self) -> None:
        pass


class FakeProc:
    pid = os.getpid()

    def poll(self):
        return None


class FakeKernel:
    """Stands in for the ipykernel process: the agent's op logic is under test here."""

    instances: list[FakeKernel] = []

    def __init__(self, ctx, key: bytes) -> None:
        self.key = key
        self.ready = False
        self.cgroup = None        # no guest cgroup on the test host
        self.new_key = None
        self.sockets = {}
        self.proc = FakeProc()
        self.interrupted = 0
        FakeKernel.instances.append(self)

    def poll_ready(self) -> None:
        pass

    def interrupt(self) -> None:
        self.interrupted += 1

    def rss_kib(self) -> int:
        return 1


@pytest.fixture
def agent_pair(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_mod, "GuestKernel", FakeKernel)
    monkeypatch.setattr(agent_mod, "USER_HOME", str(tmp_path))
    monkeypatch.setattr(agent_mod, "FILE_ROOTS", (str(tmp_path),))
    monkeypatch.setattr(agent_mod, "USER_UID", os.getuid())
    monkeypatch.setattr(agent_mod, "USER_GID", os.getgid())
    monkeypatch.setattr(agent_mod, "MAX_FILE", 1000)
    host_sock, guest_sock = socket.socketpair()
    agent = agent_mod.Agent(SocketLink(guest_sock))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    yield host_sock, agent
    agent.shutting_down = True
    thread.join(2)
    host_sock.close()
    guest_sock.close()


async def _channel(host_sock, stale: bytes = b""):
    frames = []
    reader, writer = await asyncio.open_unix_connection(sock=host_sock)
    chan = GuestChannel(reader, writer, lambda c, b: frames.append((c, b)), lambda e: None)
    return chan, frames


def test_hello_then_ops(agent_pair, tmp_path):
    host_sock, agent = agent_pair

    async def scenario():
        chan, _ = await _channel(host_sock)
        reply = await chan.handshake({"key": "ab" * 32}, timeout=5)
        assert reply["ok"] and reply["proto"] == wire.PROTOCOL_VERSION
        chan.start()
        assert (await chan.request("ping"))["ok"]
        stats = await chan.request("stats")
        assert stats["vcpus"] == os.cpu_count() and stats["mem_total_kib"] > 0
        await chan.request("interrupt")
        put = await chan.request("put", path="sub/f.txt", data=base64.b64encode(b"hello").decode())
        assert put["ok"] and (tmp_path / "sub" / "f.txt").read_bytes() == b"hello"
        got = await chan.request("get", path="sub/f.txt")
        assert base64.b64decode(got["data"]) == b"hello"
        escape = await chan.request("put", path="../../etc/x", data="")
        assert not escape["ok"] and "outside" in escape["error"]
        big = await chan.request("put", path="big", data=base64.b64encode(b"x" * 1001).decode())
        assert not big["ok"] and "limited" in big["error"]
        bad = await chan.request("frobnicate")
        assert not bad["ok"] and "unknown op" in bad["error"]
        await chan.close()

    asyncio.run(scenario())
    assert FakeKernel.instances[-1].key == b"ab" * 32
    assert FakeKernel.instances[-1].interrupted == 1


def test_the_hosts_frame_limit_from_the_hello_holds_in_the_agent(agent_pair):
    """A host with a smaller message limit says so in its hello: a larger kernel
    output is dropped in the VM with an event naming its size, and the channel
    lives on (the host would end it on an oversized frame)."""
    host_sock, agent = agent_pair
    events, closed = [], []

    async def scenario():
        reader, writer = await asyncio.open_unix_connection(sock=host_sock)
        chan = GuestChannel(reader, writer, lambda c, b: events.append((c, b)), closed.append,
                            max_frame=128 * 1024 + 64 * 1024)
        await chan.handshake({"key": "ab" * 32, "max_frame": 128 * 1024}, timeout=5)
        chan.start()
        agent.outbox.put(Channel.IOPUB, b"x" * (200 * 1024))
        agent.outbox.put(Channel.IOPUB, b"small")
        for _ in range(200):
            if len(events) >= 2:
                break
            await asyncio.sleep(0.01)
        assert (await chan.request("ping"))["ok"]
        await chan.close()

    asyncio.run(scenario())
    assert not closed
    assert json.loads(events[0][1]) == {"event": "dropped", "channel": int(Channel.IOPUB),
                                        "size": 200 * 1024, "limit": 128 * 1024}
    assert events[1] == (Channel.IOPUB, b"small")


def test_a_hello_cannot_set_the_frame_limit_out_of_range(agent_pair):
    host_sock, agent = agent_pair

    async def scenario():
        chan, _ = await _channel(host_sock)
        await chan.handshake({"key": "ab" * 32, "max_frame": 1}, timeout=5)
        low = agent.outbox.max_frame
        await chan.handshake({"key": "ab" * 32, "max_frame": 2**40}, timeout=5)
        await chan.close()
        return low, agent.outbox.max_frame

    low, high = asyncio.run(scenario())
    assert (low, high) == (agent_mod.MIN_FRAME, wire.MAX_FRAME)


def test_symlink_out_of_home_is_refused(agent_pair, tmp_path):
    host_sock, _ = agent_pair
    (tmp_path / "link").symlink_to("/etc")

    async def scenario():
        chan, _ = await _channel(host_sock)
        await chan.handshake({"key": "cd" * 32}, timeout=5)
        chan.start()
        reply = await chan.request("get", path="link/passwd")
        assert not reply["ok"] and "symbolic links are not followed" in reply["error"]
        await chan.close()

    asyncio.run(scenario())


def test_stale_bytes_before_the_hello_are_skipped(agent_pair):
    """A reconnecting host may find half a frame left over; the sync marker fixes that."""
    host_sock, agent = agent_pair
    agent.outbox.put(Channel.IOPUB, b"old output " * 1000)

    async def scenario():
        chan, _ = await _channel(host_sock)
        reply = await chan.handshake({"key": "ef" * 32}, timeout=5)
        assert reply["ok"]
        await chan.close()

    asyncio.run(scenario())


def test_protocol_mismatch_is_reported(agent_pair, monkeypatch):
    """An agent from another protocol version makes the host refuse, naming the fix."""
    host_sock, _ = agent_pair
    newer = types.SimpleNamespace(**{k: getattr(wire, k) for k in dir(wire) if not k.startswith("__")})
    newer.PROTOCOL_VERSION = wire.PROTOCOL_VERSION + 1
    monkeypatch.setattr(agent_mod, "wire", newer)

    async def scenario():
        chan, _ = await _channel(host_sock)
        with pytest.raises(ProtocolMismatch, match="rebuild") as info:
            await chan.handshake({"key": "00" * 32}, timeout=5)
        assert info.value.guest == wire.PROTOCOL_VERSION + 1

    asyncio.run(scenario())


def test_short_key_is_refused(agent_pair):
    host_sock, _ = agent_pair

    async def scenario():
        chan, _ = await _channel(host_sock)
        with pytest.raises(ProtocolError, match="key"):
            await chan.handshake({"key": "short"}, timeout=5)

    asyncio.run(scenario())


def test_oversized_frame_from_guest_closes_the_channel():
    """A frame announcing more than the limit is a protocol violation, not a buffer."""
    host_sock, guest_sock = socket.socketpair()
    closed = []

    async def scenario():
        reader, writer = await asyncio.open_unix_connection(sock=host_sock)
        chan = GuestChannel(reader, writer, lambda c, b: None, closed.append, max_frame=1024)
        chan.start()
        guest_sock.sendall(wire.HEADER.pack(4096, Channel.IOPUB) + b"x" * 10)
        for _ in range(100):
            if closed:
                break
            await asyncio.sleep(0.01)
        await chan.close()

    asyncio.run(scenario())
    assert closed and isinstance(closed[0], ProtocolError)
    guest_sock.close()


def test_control_frames_jump_the_queue():
    host_sock, guest_sock = socket.socketpair()

    async def scenario():
        reader, writer = await asyncio.open_unix_connection(sock=host_sock)
        chan = GuestChannel(reader, writer, lambda c, b: None, lambda e: None)
        for i in range(50):
            chan.send(Channel.SHELL, b"bulk%d" % i)
        chan.send(Channel.CONTROL, b"interrupt")
        chan.start()
        await asyncio.sleep(0.2)
        await chan.close()

    asyncio.run(scenario())
    guest_sock.settimeout(1)
    frames = wire.FrameDecoder().feed(guest_sock.recv(1 << 20))
    assert frames[0] == (Channel.CONTROL, b"interrupt")
    guest_sock.close()


def test_messages_naming_the_agent_are_parsed_or_dropped_never_fatal():
    is_own = agent_mod.GuestKernel.is_own
    prefix = guest_kernel.AGENT_MSG_PREFIX

    def msg(header: bytes, parent: bytes, content: bytes) -> list[bytes]:
        return [b"<IDS|MSG>", b"sig", header, parent, b"{}", content]

    own = is_own(None, msg(b'{"msg_type": "status"}', f'{{"msg_id": "{prefix}1"}}'.encode(),
                           b'{"execution_state": "busy"}'))
    assert own == {"msg_type": "status", "parent_id": f"{prefix}1", "content": {"execution_state": "busy"}}
    assert is_own(None, msg(b"{}", b'{"msg_id": "frontend-1"}', b"{}")) is None
    # Forged by code in a cell: not JSON, or JSON that is not an object.
    for bad in (msg(b"{", f'{{"msg_id": "{prefix}2"}}'.encode(), b"{}"),
                msg(b"{}", f'{{"msg_id": "{prefix}3"}}'.encode(), b"[1, 2]")):
        assert is_own(None, bad) == {"msg_type": None, "parent_id": None, "content": {}}


def test_forged_busy_in_a_cold_booted_vm_hands_out_no_key():
    # A cold-booted kernel has no warm-up request of the agent's in flight
    # (warming is None): a status naming the agent must not reach send_key.
    agent = agent_mod.Agent.__new__(agent_mod.Agent)
    sent = []
    kernel = types.SimpleNamespace(
        is_own=lambda parts: {"msg_type": "status", "parent_id": None, "content": {"execution_state": "busy"}},
        warming=None, new_key=None, key_w=7, settling=None, ready=True, kernel_info={"x": 1},
        send_key=lambda: sent.append("key"))
    agent.kernel = kernel
    agent.on_kernel_message(Channel.IOPUB, [b"<IDS|MSG>"])
    kernel.is_own = lambda parts: {"msg_type": "execute_reply", "parent_id": None, "content": {}}
    agent.on_kernel_message(Channel.SHELL, [b"<IDS|MSG>"])   # no settling request: not a warm-up reply
    assert sent == [] and kernel.settling is None


def _run_warmup(key_r: int, ack_w: int, killed_file: str = "/nonexistent/killed-pids"):
    """Run the agent's warm-up code as the guest kernel would, with a stand-in kernel."""
    session = types.SimpleNamespace(key=b"old", session="template-session")
    cells = []

    def run_cell(code, store_history=True):
        cells.append((code, store_history))
        sys.last_value = KeyboardInterrupt()     # what IPython leaves after a failing cell

    hooks = []
    events = types.SimpleNamespace(register=lambda name, fn: hooks.append((name, fn)))
    shell = types.SimpleNamespace(kernel=types.SimpleNamespace(session=session), run_cell=run_cell,
                                  events=events)
    exec(guest_kernel.warmup_cell(key_r, ack_w, killed_file),
         {"get_ipython": lambda: shell})
    assert [name for name, _ in hooks] == ["post_run_cell"]
    session.reap_killed = hooks[0][1]
    # The warm-up ran one failing cell outside the history and left no trace of its error.
    assert cells == [("raise KeyboardInterrupt", False)] and not hasattr(sys, "last_value")
    return session


def test_rekey_thread_takes_the_key_and_answers():
    key_r, key_w = os.pipe()
    ack_r, ack_w = os.pipe()
    session = _run_warmup(key_r, ack_w)
    os.write(key_w, b"ab" * 32 + b"\n")
    assert os.read(ack_r, 16) == b"k"
    assert session.key == b"ab" * 32 and session.session != "template-session"
    first_session = session.session
    # a checkpoint of this VM restored later (or forked): the same thread takes the next key
    os.write(key_w, b"cd" * 16)
    os.write(key_w, b"cd" * 16 + b"\n")        # a line may come in pieces
    assert os.read(ack_r, 16) == b"k"
    assert session.key == b"cd" * 32 and session.session not in (first_session, "template-session")
    os.close(key_w)
    assert os.read(ack_r, 16) == b""           # the thread closed its end
    os.close(ack_r)


def test_rekey_thread_closes_its_answer_pipe_when_no_key_comes():
    key_r, key_w = os.pipe()
    ack_r, ack_w = os.pipe()
    session = _run_warmup(key_r, ack_w)
    os.close(key_w)                             # the agent went away: EOF, not a hang
    assert os.read(ack_r, 16) == b""
    assert session.key == b"old"
    os.close(ack_r)


def test_after_a_limit_the_kernel_waits_for_its_sigkilled_children_only(tmp_path):
    """The warm-up's post_run_cell hook: once the agent has rewritten its file,
    zombie children ended by SIGKILL are waited for (each held a slot of the
    process limit); a child that exited by itself is left to its owner."""
    killed_file = tmp_path / "killed-pids"
    key_r, key_w = os.pipe()
    ack_r, ack_w = os.pipe()
    os.close(key_w)
    session = _run_warmup(key_r, ack_w, str(killed_file))
    os.close(ack_r)
    killed, exited = os.fork(), None
    if killed == 0:
        time.sleep(60)
        os._exit(0)
    exited = os.fork()
    if exited == 0:
        os._exit(3)
    os.kill(killed, signal.SIGKILL)
    time.sleep(0.3)                       # both are zombies now
    try:
        session.reap_killed(None)         # no file yet: nothing happens
        assert os.waitid(os.P_PID, killed, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        killed_file.write_text(str(killed))
        session.reap_killed(None)
        with pytest.raises(ChildProcessError):
            os.waitpid(killed, os.WNOHANG)                 # already waited for
        assert os.waitpid(exited, 0)[1] >> 8 == 3        # left alone
    finally:
        for pid in (killed, exited):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _hello_over(path: str, fields: dict, timeout: float = 5.0) -> dict | None:
    """Connect to the agent's listener, send a hello; its reply, or None if hung up on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    try:
        if fields is not None:
            sock.sendall(wire.encode_frame(Channel.AGENT, wire.encode_json(
                {"op": "hello", "id": 1, "proto": wire.PROTOCOL_VERSION, "nonce": "00" * 16,
                 "key": "ab" * 32, **fields})))
        decoder, buf = wire.FrameDecoder(), b""
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return None
            buf += chunk
            idx = buf.find(agent_mod.SYNC_MAGIC)
            if idx != -1:
                for chan, body in decoder.feed(buf[idx + len(agent_mod.SYNC_MAGIC) + 16:]):
                    return json.loads(body)
    finally:
        sock.close()


def test_with_a_link_secret_only_a_hello_carrying_it_is_heard(tmp_path, monkeypatch):
    """As on vsock, where any host user can connect to the guest's port: a hello
    without the secret or with a wrong one is hung up on, as is a connection
    that says nothing; the host's hello with it gets its answer."""
    monkeypatch.setattr(agent_mod, "GuestKernel", FakeKernel)
    monkeypatch.setattr(agent_mod, "AUTH_TIMEOUT_S", 0.5)
    path = str(tmp_path / "agent.sock")
    agent = agent_mod.Agent(guest_link.ListenerLink.unix(path))
    agent.secret, agent.authenticated = b"5" * 64, False
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    before = len(FakeKernel.instances)
    try:
        assert _hello_over(path, {}) is None
        assert _hello_over(path, {"secret": "6" * 64}) is None
        assert _hello_over(path, {"secret": ["5" * 64]}) is None
        t = time.monotonic()
        assert _hello_over(path, None) is None               # says nothing: hung up on
        assert time.monotonic() - t < 3
        assert len(FakeKernel.instances) == before           # no kernel for any of them
        reply = _hello_over(path, {"secret": "5" * 64})
        assert reply is not None and reply["ok"] and reply["proto"] == wire.PROTOCOL_VERSION
    finally:
        agent.shutting_down = True
        thread.join(2)


def test_a_link_that_needs_a_secret_and_has_none_hears_no_one(tmp_path, monkeypatch):
    """Fail closed: on vsock (any host user can connect) a seed that carried no
    link secret must not open the agent to everyone. Every hello is hung up on,
    with or without a secret; the same agent on a host-only link answers (the
    control: the helper below really reaches a listening agent)."""
    monkeypatch.setattr(agent_mod, "GuestKernel", FakeKernel)
    monkeypatch.setattr(agent_mod, "AUTH_TIMEOUT_S", 0.5)
    monkeypatch.setattr(agent_mod.seed, "LINK_SECRET_FILE", str(tmp_path / "no-secret"))
    for needs_secret, heard in ((True, False), (False, True)):
        path = str(tmp_path / f"agent-{needs_secret}.sock")
        link = guest_link.ListenerLink.unix(path)
        link.needs_secret = needs_secret
        agent = agent_mod.Agent(link)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            replies = [_hello_over(path, {}), _hello_over(path, {"secret": "5" * 64})]
            if heard:
                assert replies[0] is not None and replies[0]["ok"]
            else:
                assert replies == [None, None]
        finally:
            agent.shutting_down = True
            thread.join(2)


def test_the_folder_report_goes_out_before_the_cells_idle_or_reply_whichever_comes_first():
    # The agent reads IOPub and shell apart: "idle" can reach it before the
    # reply, and a frontend stops listening at "idle". The report of what the
    # cell wrote (said in that cell) must go out before either.
    agent = agent_mod.Agent.__new__(agent_mod.Agent)
    out, scans = [], []
    agent.outbox = types.SimpleNamespace(put_json=lambda obj: out.append(("event", obj["event"])),
                                         put=lambda chan, body: out.append((chan.name, None)))
    agent.kernel = types.SimpleNamespace(is_own=lambda parts: None)
    agent.check_limits = lambda force=False: None
    agent.workdir = types.SimpleNamespace(changes=lambda: scans.append(1) or {"event": "workdir_changed"})
    agent.workdir_reported_for = None

    def msg(msg_type: str, parent: dict, content: dict) -> list[bytes]:
        return [b"<IDS|MSG>", b"sig", json.dumps({"msg_type": msg_type, "msg_id": "k1"}).encode(),
                json.dumps(parent).encode(), b"{}", json.dumps(content).encode()]

    cell = {"msg_id": "cell-1", "msg_type": "execute_request"}
    agent.on_kernel_message(Channel.IOPUB, msg("status", cell, {"execution_state": "busy"}))
    agent.on_kernel_message(Channel.IOPUB, msg("status", cell, {"execution_state": "idle"}))
    agent.on_kernel_message(Channel.SHELL, msg("execute_reply", cell, {"status": "ok"}))
    assert out == [("IOPUB", None), ("event", "workdir_changed"), ("IOPUB", None), ("SHELL", None)]
    assert len(scans) == 1       # the reply ends the same cell: no second scan
    # the usual order (reply, then idle): the report goes before the reply
    out.clear()
    cell2 = {"msg_id": "cell-2", "msg_type": "execute_request"}
    agent.on_kernel_message(Channel.SHELL, msg("execute_reply", cell2, {"status": "ok"}))
    agent.on_kernel_message(Channel.IOPUB, msg("status", cell2, {"execution_state": "idle"}))
    assert out == [("event", "workdir_changed"), ("SHELL", None), ("IOPUB", None)]
    # a widget's comm_msg idle is no cell's end
    out.clear()
    agent.on_kernel_message(Channel.IOPUB, msg("status", {"msg_id": "c", "msg_type": "comm_msg"},
                                               {"execution_state": "idle"}))
    assert out == [("IOPUB", None)] and len(scans) == 2
