"""The states a Sandbox's VM goes through (sandbox.py drives them; pause.py too)."""

from __future__ import annotations

import enum


class SandboxState(enum.Enum):
    STOPPED = "stopped"
    BOOTING = "booting"
    READY = "ready"
    BUSY = "busy"
    #: Saved to disk while idle, its VMM gone; resumed by its next use (pause.py).
    PAUSED = "paused"
    DEAD = "dead"
