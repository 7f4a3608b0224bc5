"""The guest system as the agent sees it: its log, memory, entropy pool and OOM killer."""

from __future__ import annotations

import fcntl
import os
import struct
import sys

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def log(msg: str) -> None:
    print(f"smolvm-agent: {msg}", file=sys.stderr, flush=True)


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    return out


def add_entropy(data: bytes) -> None:
    """Mix host entropy into the pool and credit it (struct rand_pool_info)."""
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            # Credited entropy alone waits for the next scheduled reseed; a
            # restored snapshot must not hand out the template's stream meanwhile.
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as exc:
        log(f"cannot add entropy: {exc}")


def oom_kills() -> int:
    """How many processes the VM's out-of-memory killer has killed since boot."""
    try:
        with open("/proc/vmstat") as fh:
            for line in fh:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def set_oom_score(value: int, pid: int | str = "self") -> None:
    """Set a process's OOM score adjustment (by default the caller's)."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as fh:
            fh.write(str(value))
    except OSError:
        pass
