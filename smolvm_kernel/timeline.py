"""Timestamps of one kernel's start, for ``benchmarks/launch_timeline.py``.

Off unless ``SMOLVM_TIMELINE`` names a file: then the kernel process records
wall-clock marks (the launcher's exec, ports listening, imports done, the
VM's restore, hello, ready, the first cell in and out) and writes them there
as one JSON object once the first execute_reply has gone to the frontend.
A mark costs one attribute test when off.
"""

from __future__ import annotations

import json
import os
import time

_path = os.environ.get("SMOLVM_TIMELINE") or None
_marks: list[tuple[str, float]] = []


def enabled() -> bool:
    return _path is not None


def mark(name: str, at: float | None = None) -> None:
    """Record ``name`` now (or at ``at``, a time.time() value); the first mark of a name wins."""
    if _path is not None and all(n != name for n, _ in _marks):
        _marks.append((name, time.time() if at is None else at))


def finish() -> None:
    """Write the marks (once) and stop recording."""
    global _path
    if _path is None:
        return
    path, _path = _path, None
    try:
        with open(path, "w") as fh:
            json.dump({"pid": os.getpid(), "marks": dict(_marks)}, fh)
    except OSError:
        pass
