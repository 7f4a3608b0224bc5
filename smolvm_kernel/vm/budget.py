"""OutputBudget: how much of the guest's output one request may pass on.

The guest decides how much it prints; the host decides how much of it a
frontend (or a Sandbox caller) receives. Each request gets ``limit`` bytes;
past them every message is dropped and counted, so the notebook can say how
much was lost, and what the host holds for a slow reader is bounded in bytes.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class OutputBudget:
    limit: int
    sent: int = 0
    dropped: int = 0
    dropped_msgs: int = 0

    def charge(self, size: int) -> bool:
        """Count a message of ``size`` bytes; False when it must be dropped
        (once anything was dropped, everything after it is too: no output
        arrives out of order with a gap in the middle)."""
        if self.dropped or self.sent + size > self.limit:
            self.dropped += size
            self.dropped_msgs += 1
            return False
        self.sent += size
        return True

    @property
    def just_exhausted(self) -> bool:
        """Whether the message just charged was the first one dropped."""
        return self.dropped_msgs == 1 and self.dropped > 0


def size_label(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"
