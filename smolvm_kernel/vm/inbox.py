"""Inbox: the guest's messages for one request of a Sandbox caller, bounded in bytes.

``Sandbox.execute`` yields a cell's outputs as the caller iterates; a caller
that iterates slowly (or a guest that prints without end) must not make the
host hold more than the cell's output limit. Past it, messages are dropped and
counted; the caller gets one note when it starts and one with the total before
the reply, and the first reply and one "idle" always arrive, so execute() ends.
"""

from __future__ import annotations

import queue

from smolvm_kernel.vm.budget import OutputBudget, size_label

class Inbox(queue.Queue):
    """A queue of guest messages (dicts) and host notes for one request."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.budget = OutputBudget(limit)
        self._idle_after_limit = False
        self._replied = False

    def offer(self, msg: dict, size: int) -> None:
        """Queue a deserialized guest message of ``size`` bytes, or count it as dropped."""
        mtype = msg["msg_type"]
        if msg["channel"] in ("shell", "control"):
            if self._replied:
                return          # one reply per request: later ones are forged
            self._replied = True
            if self.budget.dropped:
                self.put(_note(f"[smolvm] {size_label(self.budget.dropped)} of this cell's output "
                               f"({self.budget.dropped_msgs} messages) was dropped: over the "
                               f"{size_label(self.budget.limit)} limit\n"))
            self.put(msg)
            return
        if (self.budget.dropped and mtype == "status" and not self._idle_after_limit
                and msg["content"].get("execution_state") == "idle"):
            self._idle_after_limit = True     # the one execute() waits for
            self.put(msg)
            return
        if self.budget.charge(size):
            self.put(msg)
        elif self.budget.just_exhausted:
            self.put(_note(f"[smolvm] this cell's output reached the {size_label(self.budget.limit)} "
                           f"limit (SandboxConfig.max_output_mib); the rest is dropped\n"))


def _note(text: str) -> dict:
    """A host note, shaped like a guest stream message."""
    return {"msg_type": "stream", "channel": "iopub", "content": {"name": "stderr", "text": text}}
