"""ByteGate: a bound, in bytes, on guest frames handed from the I/O thread to the kernel's loop.

The guest channel is read on the I/O thread; the kernel's loop relays what it
reads to the frontend. If the loop falls behind (a busy host, a guest that
writes faster than the relay can sign and send), the frames between them
would pile up without end. Past ``high`` bytes the gate asks for reading to
stop; once the loop is down to ``high / 2`` it asks for reading to resume.
The host then holds at most ``high`` + one frame + one read chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class ByteGate:
    def __init__(self, high: int, pause: Callable[[bool], None]) -> None:
        """``pause(True/False)`` must not block: it is called under the gate's lock."""
        self.high = high
        self._pause = pause
        self._lock = threading.Lock()
        self._held = 0
        self._paused = False
        #: The most bytes ever held at once (for tests and benchmarks).
        self.peak = 0
        #: How many times reading was paused.
        self.pauses = 0

    def add(self, n: int) -> None:
        """Bytes handed over (the I/O thread)."""
        with self._lock:
            self._held += n
            self.peak = max(self.peak, self._held)
            if self._paused or self._held < self.high:
                return
            self._paused = True
            self.pauses += 1
            self._pause(True)     # under the lock: pause and resume reach the loop in order

    def done(self, n: int) -> None:
        """Bytes relayed or dropped (the kernel's loop)."""
        with self._lock:
            self._held -= n
            if not self._paused or self._held > self.high // 2:
                return
            self._paused = False
            self._pause(False)

    @property
    def held(self) -> int:
        return self._held
