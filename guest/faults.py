"""Fault injection for the host's death-matrix and channel tests.

Not part of a production agent's ops: agent.py loads this module only after
a hello that carries ``"faults": true``, which the host sends only for a
Sandbox made with ``guest_faults=True`` (tests/vm/test_deaths.py). Only the
host reaches the agent at all (the channel device is root's), so guest code
can cause none of these.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from smolvm_guest import wire
from smolvm_guest.wire import Channel


class Faults:
    """A guest kernel panic, the agent's own death, root flooding the console,
    a flood of frames that are not Jupyter messages, bytes that are not a frame."""

    def __init__(self, outbox) -> None:
        self.outbox = outbox

    def op_fault(self, req: dict) -> dict:
        """Fault injection for the host's death-matrix and channel tests: a guest
        kernel panic, the agent's own death, root flooding the console, a flood
        of frames that are not Jupyter messages, bytes that are not a frame.
        Only the host reaches this (the channel device is root's); guest code
        can cause none of them."""
        what = req.get("what")
        if what == "panic":
            os.sync()
            with open("/proc/sysrq-trigger", "w") as fh:
                fh.write("c")
        elif what == "agent":
            os.kill(os.getpid(), signal.SIGKILL)
        elif what in ("console", "flood"):
            # Root printing to the console without end; a compromised agent
            # flooding the channel with frames that are not Jupyter messages.
            n = max(0, min(int(req.get("n", 0)), 64 * 1024 * 1024))
            target = self._fault_console if what == "console" else self._fault_flood
            threading.Thread(target=target, args=(n,), daemon=True).start()
            return {}
        elif what == "garbage":
            self.outbox.inject(b"\xff" * 64)     # a header no host accepts
            return {}
        raise ValueError(f"unknown fault {what!r}; use panic, agent, console, flood or garbage")

    @staticmethod
    def _fault_console(n: int) -> None:
        line = b"smolvm console fault " + b"x" * 1002 + b"\n"
        with open("/dev/console", "wb", buffering=0) as fh:
            for _ in range(n // len(line) + 1):
                fh.write(line)

    def _fault_flood(self, n: int) -> None:
        junk = [os.urandom(1024), wire.pack_parts([b"<IDS|MSG>", b"0" * 64, b"{}", b"{}", b"{}", b"{}"])]
        for i in range(n):
            while self.outbox.low_full():
                time.sleep(0.001)
            self.outbox.put(Channel.IOPUB, junk[i % 2])

