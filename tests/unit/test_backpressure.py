"""Backpressure from the kernel's loop to the guest channel: the host holds a
bounded number of bytes between reading the guest and relaying it."""

from __future__ import annotations

import asyncio
import socket
import threading

from smolvm_guest import wire
from smolvm_guest.wire import Channel
from smolvm_kernel.channel.stream import GuestChannel
from smolvm_kernel.jupyter.backpressure import ByteGate


def test_the_gate_pauses_past_high_and_resumes_at_half():
    calls = []
    gate = ByteGate(1000, calls.append)
    for _ in range(9):
        gate.add(100)
    assert calls == []
    gate.add(100)                     # 1000: pause
    gate.add(100)                     # already paused: no second call
    assert calls == [True]
    gate.done(500)                    # 600 > 500: still paused
    assert calls == [True]
    gate.done(100)                    # 500: resume
    assert calls == [True, False] and gate.held == 500 and gate.peak == 1100 and gate.pauses == 1


def test_pause_and_resume_from_two_threads_end_in_the_state_the_gate_holds():
    """add() on one thread, done() on another, many times: the last call the
    channel got always matches the gate's own view (never paused for ever)."""
    calls, lock = [], threading.Lock()
    gate = ByteGate(10_000, lambda p: calls.append(p))

    def producer():
        for _ in range(20_000):
            gate.add(7)

    def consumer():
        taken = 0
        while taken < 20_000 * 7:
            if gate.held >= 7:
                gate.done(7)
                taken += 7

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert gate.held == 0
    assert calls == [] or calls[-1] is False
    assert all(a != b for a, b in zip(calls, calls[1:]))     # strictly alternating


def test_a_paused_channel_reads_nothing_until_resumed():
    host_sock, guest_sock = socket.socketpair()
    got = []

    async def scenario():
        reader, writer = await asyncio.open_unix_connection(sock=host_sock)
        chan = GuestChannel(reader, writer, lambda c, b: got.append(b), lambda e: None)
        chan.start()
        guest_sock.sendall(wire.encode_frame(Channel.IOPUB, b"one"))
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        chan.pause_reading()
        await asyncio.sleep(0.05)      # the read loop is waiting in read(): one more frame may land
        guest_sock.sendall(wire.encode_frame(Channel.IOPUB, b"two"))
        await asyncio.sleep(0.05)
        guest_sock.sendall(wire.encode_frame(Channel.IOPUB, b"three"))
        await asyncio.sleep(0.2)
        during = list(got)
        assert chan.paused
        chan.resume_reading()
        for _ in range(100):
            if len(got) == 3:
                break
            await asyncio.sleep(0.01)
        await chan.close()
        return during

    during = asyncio.run(scenario())
    assert b"three" not in during and got == [b"one", b"two", b"three"]
    guest_sock.close()
