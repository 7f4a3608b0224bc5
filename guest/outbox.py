"""Frames for the host, written by one thread; priority frames (the agent's, control) go first."""

from __future__ import annotations

import collections
import threading
import time

from smolvm_guest import wire
from smolvm_guest.system import log
from smolvm_guest.wire import Channel

#: Host-bound Jupyter frames waiting to be written; past this the agent stops
#: reading the kernel's sockets, so a flood backs up into ZMQ, not into RAM.
LOW_QUEUE_LIMIT = 256
#: Bytes of kernel output the agent holds for the host at most; beyond it the
#: agent stops reading the kernel, whose IOPub then drops (see KERNEL_MAIN):
#: an output flood must not fill the VM's memory.
LOW_QUEUE_BYTES = 8 * 1024 * 1024


class Outbox:
    """Frames for the host, written by one thread; priority frames go first."""

    def __init__(self, link) -> None:
        self.link = link
        self._high: collections.deque[bytes] = collections.deque()
        self._low: collections.deque[bytes] = collections.deque()
        self._low_bytes = 0
        #: The largest frame body the host accepts: it says so in its hello
        #: (a larger frame would end the channel, so it is dropped here, and
        #: the host is told).
        self.max_frame = wire.MAX_FRAME
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="outbox", daemon=True).start()

    def put(self, channel: Channel, body: bytes) -> None:
        if len(body) > self.max_frame:
            self.put_json({"event": "dropped", "channel": int(channel), "size": len(body),
                           "limit": self.max_frame})
            return
        frame = wire.encode_frame(channel, body)
        with self._cond:
            if channel in wire.PRIORITY_CHANNELS:
                self._high.append(frame)
            else:
                self._low.append(frame)
                self._low_bytes += len(frame)
            self._cond.notify()

    def put_json(self, obj: dict) -> None:
        self.put(Channel.AGENT, wire.encode_json(obj))

    def restart(self, preamble: bytes) -> None:
        """Drop everything queued for a previous host and send ``preamble`` first."""
        with self._cond:
            self._high.clear()
            self._low.clear()
            self._low_bytes = 0
            self._high.append(preamble)
            self._cond.notify()

    def inject(self, raw: bytes) -> None:
        """Send ``raw`` as it is, before anything queued (fault injection only)."""
        with self._cond:
            self._high.appendleft(raw)
            self._cond.notify()

    def low_full(self) -> bool:
        return len(self._low) >= LOW_QUEUE_LIMIT or self._low_bytes >= LOW_QUEUE_BYTES

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._high and not self._low:
                    self._cond.wait()
                if self._high:
                    frame = self._high.popleft()
                else:
                    frame = self._low.popleft()
                    self._low_bytes -= len(frame)
            try:
                self.link.write_all(frame)
            except OSError as exc:
                log(f"write to host failed: {exc}")
                time.sleep(0.05)
