"""Facts about host processes from /proc: start time, state, resident memory.

A pid is reused; the pair (pid, start time) is not, so owners are recorded
and checked as that pair.
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 on), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started, or None if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def parent_and_start(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of ``pid`` from one read of its stat, or None if it is gone."""
    fields = _stat_fields(pid)
    try:
        return (int(fields[1]), int(fields[19])) if fields else None
    except (IndexError, ValueError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, D, T ...), or None if it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def process_alive(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and process_start_time(pid) == start


def status_field(pid: int | str, name: str) -> str | None:
    """The first value of line ``name`` (e.g. "VmRSS") of /proc/<pid>/status, or None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return line.split()[1]
    except (OSError, IndexError):
        pass
    return None


def rss_kib(pid: int | None) -> int | None:
    """A process's resident memory in KiB, or None when it is gone."""
    value = status_field(pid, "VmRSS") if pid else None
    return int(value) if value is not None else None


def meminfo_mib(key: str, default: int = 0) -> int:
    """One /proc/meminfo figure (``MemTotal``, ``MemAvailable``, ...) in MiB, or ``default``."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return default


def this_process() -> tuple[int, int]:
    pid = os.getpid()
    return pid, process_start_time(pid) or 0
