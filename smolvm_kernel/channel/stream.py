"""GuestChannel: the one framed byte stream to the guest agent, host side.

Whatever the transport (virtio-serial socket, hybrid vsock, SSH channel), the
Sandbox sees an asyncio reader/writer pair; this class frames it, gives
control frames their own queue, matches agent replies to requests, and hands
every other frame to ``on_frame``. Every frame from the guest is size-checked
by the decoder before it is buffered.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import os
import time
from collections.abc import Callable

from smolvm_guest import wire
from smolvm_guest.wire import SYNC_MAGIC, Channel
from smolvm_kernel.errors import GuestDied, ProtocolError, ProtocolMismatch

#: Stale bytes we are willing to skip while looking for the sync marker.
MAX_RESYNC_BYTES = 64 * 1024 * 1024

FrameHandler = Callable[[Channel, bytes], None]
CloseHandler = Callable[[BaseException | None], None]


class GuestChannel:
    """Frame, prioritise and dispatch one connection to the guest agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_frame: FrameHandler, on_close: CloseHandler,
                 max_frame: int = wire.MAX_FRAME) -> None:
        self._reader = reader
        self._writer = writer
        self._on_frame = on_frame
        self._on_close = on_close
        self._decoder = wire.FrameDecoder(max_frame)
        self._high: collections.deque[bytes] = collections.deque()
        self._low: collections.deque[bytes] = collections.deque()
        self._wakeup = asyncio.Event()
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict]] = {}
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._reading = asyncio.Event()      # cleared while the host's consumer is behind
        self._reading.set()
        #: When the guest last sent anything (the event loop's clock): the heartbeat's input.
        self.last_heard = asyncio.get_running_loop().time()

    async def handshake(self, hello: dict, timeout: float) -> dict:
        """Send ``hello``, skip stale bytes up to the sync marker, return the reply."""
        nonce = os.urandom(16)
        rid = next(self._ids)
        msg = {"op": "hello", "id": rid, "proto": wire.PROTOCOL_VERSION, "nonce": nonce.hex(),
               "time": time.time(), "entropy": base64.b64encode(os.urandom(64)).decode(), **hello}
        self._writer.write(wire.encode_frame(Channel.AGENT, wire.encode_json(msg)))
        await self._writer.drain()
        marker = SYNC_MAGIC + nonce
        skipped = 0

        async def find_marker() -> bytes:
            nonlocal skipped
            buf = bytearray()
            while True:
                chunk = await self._reader.read(1 << 16)
                if not chunk:
                    raise GuestDied("the guest closed its channel during the handshake")
                buf += chunk
                idx = buf.find(marker)
                if idx != -1:
                    return bytes(buf[idx + len(marker):])
                # Keep only what could still hold the start of the marker.
                keep = len(marker) - 1
                skipped += max(0, len(buf) - keep)
                del buf[:-keep]
                if skipped > MAX_RESYNC_BYTES:
                    raise ProtocolError("no sync marker from the guest agent in 64 MiB of output")

        rest = await asyncio.wait_for(find_marker(), timeout)
        pending = collections.deque(self._decoder.feed(rest))
        while True:
            while pending:
                chan, body = pending.popleft()
                if chan == Channel.AGENT:
                    reply = wire.decode_json(body)
                    if reply.get("id") == rid:
                        self._backlog = list(pending)
                        return self._check_hello(reply)
                # Nothing but the hello reply can precede it after a resync.
                raise ProtocolError(f"unexpected {chan.name} frame before the hello reply")
            chunk = await asyncio.wait_for(self._reader.read(1 << 16), timeout)
            if not chunk:
                raise GuestDied("the guest closed its channel during the handshake")
            pending.extend(self._decoder.feed(chunk))

    @staticmethod
    def _check_hello(reply: dict) -> dict:
        if reply.get("mismatch"):
            raise ProtocolMismatch(wire.PROTOCOL_VERSION, reply.get("proto"))
        if not reply.get("ok"):
            raise ProtocolError(f"the guest agent refused the hello: {reply.get('error')}")
        if reply.get("proto") != wire.PROTOCOL_VERSION:
            raise ProtocolMismatch(wire.PROTOCOL_VERSION, reply.get("proto"))
        return reply

    def start(self) -> None:
        """Start the reader and writer tasks (after :meth:`handshake`)."""
        self._tasks = [asyncio.create_task(self._read_loop(), name="smolvm-chan-read"),
                       asyncio.create_task(self._write_loop(), name="smolvm-chan-write")]
        for chan, body in getattr(self, "_backlog", []):
            self._dispatch(chan, body)

    def send(self, channel: Channel, body: bytes) -> None:
        """Queue a frame (loop thread only); control frames jump the queue."""
        if self._closed:
            raise GuestDied("the channel to the guest is closed")
        frame = wire.encode_frame(channel, body)
        (self._high if channel in wire.PRIORITY_CHANNELS else self._low).append(frame)
        self._wakeup.set()

    async def request(self, op: str, timeout: float = 10.0, **fields) -> dict:
        """Send an agent op and wait for its reply."""
        rid = next(self._ids)
        fut: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            self.send(Channel.AGENT, wire.encode_json({"op": op, "id": rid, **fields}))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(rid, None)

    async def _read_loop(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                await self._reading.wait()
                chunk = await self._reader.read(1 << 18)
                if not chunk:
                    break
                self.last_heard = asyncio.get_running_loop().time()
                for chan, body in self._decoder.feed(chunk):
                    self._dispatch(chan, body)
        except wire.FrameError as exc:
            error = ProtocolError(f"the guest broke the frame protocol: {exc}")
        except (ConnectionError, OSError) as exc:
            error = exc
        except asyncio.CancelledError:
            return
        self._finish(error)

    def pause_reading(self) -> None:
        """Stop reading the guest (loop thread): whoever consumes its frames is
        behind. The guest's writes then back up into the transport and the
        agent, which drops its own queue past its bound, not into host memory."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self.last_heard = asyncio.get_running_loop().time()   # silence while paused was ours
        self._reading.set()

    @property
    def paused(self) -> bool:
        return not self._reading.is_set()

    def _dispatch(self, chan: Channel, body: bytes) -> None:
        if chan == Channel.AGENT:
            msg = wire.decode_json(body)
            rid = msg.get("id")
            if isinstance(rid, int) and rid in self._replies:
                fut = self._replies.pop(rid)
                if not fut.done():
                    fut.set_result(msg)
                return
        self._on_frame(chan, body)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._high or self._low:
                    frame = self._high.popleft() if self._high else self._low.popleft()
                    self._writer.write(frame)
                    await self._writer.drain()
        except asyncio.CancelledError:
            return
        except (ConnectionError, OSError) as exc:
            self._finish(exc)

    def _finish(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(GuestDied("the channel to the guest closed"))
        self._replies.clear()
        self._on_close(error)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Stop both tasks and close the transport; safe to call twice."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
