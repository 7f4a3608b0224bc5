"""The notebook's folder in the VM: what changed in it since the host last looked.

The host copies the notebook's folder into the user's home when the VM
starts (``workdir_put``), then asks the agent to watch it (``workdir_watch``).
At the end of every cell (an ``execute_reply`` on its way out) the agent scans
the home folder and tells the host which regular files are new or changed and
which are gone (a ``workdir_changed`` event, sent before the reply). The host
decides what it copies back and by which rules: nothing here is trusted by it.

The scan runs as root in the agent's own loop, so it is bounded: no hidden
name, no symbolic link followed (each folder is opened by ``O_NOFOLLOW``
relative to its parent), at most :data:`MAX_ENTRIES` entries and
:data:`MAX_DEPTH` levels. It reads names and ``lstat`` figures only, never a
file's content (the host reads those through ``get``, as the user).
"""

from __future__ import annotations

import os
import stat

MAX_ENTRIES = 20000
MAX_DEPTH = 16
#: Most changed paths one event names (the rest: ``truncated``).
MAX_REPORTED = 2000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SKIPPED_DIRS = ("__pycache__",)


def scan(root: str) -> tuple[dict[str, tuple[int, int]], bool]:
    """Regular files under ``root``: relative path -> (size, mtime_ns); and
    whether the scan stopped at a bound."""
    found: dict[str, tuple[int, int]] = {}
    budget = [MAX_ENTRIES]
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return found, False
    complete = _scan_dir(fd, "", 0, found, budget)
    return found, not complete


def _scan_dir(fd: int, prefix: str, depth: int, found: dict, budget: list[int]) -> bool:
    """Walk one folder (``fd`` is closed here); False if a bound was reached."""
    complete = True
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                budget[0] -= 1
                if budget[0] < 0:
                    return False
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                rel = prefix + name
                if stat.S_ISREG(st.st_mode):
                    found[rel] = (st.st_size, st.st_mtime_ns)
                elif stat.S_ISDIR(st.st_mode) and name not in _SKIPPED_DIRS:
                    if depth + 1 >= MAX_DEPTH:
                        complete = False
                        continue
                    try:
                        sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue     # swapped for a link, or gone: not followed
                    complete = _scan_dir(sub, rel + "/", depth + 1, found, budget) and complete
                    if budget[0] < 0:
                        return False
    except OSError:
        pass
    finally:
        os.close(fd)
    return complete


class Watch:
    """The last scan of the folder, and the difference to a new one."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.known, _ = scan(root)

    def changes(self) -> dict | None:
        """The event for the host (None: nothing changed since the last call)."""
        now, truncated = scan(self.root)
        changed = [[rel, size] for rel, (size, mtime) in now.items() if self.known.get(rel) != (size, mtime)]
        removed = [rel for rel in self.known if rel not in now] if not truncated else []
        self.known = now
        if not changed and not removed:
            return None
        changed.sort()
        more = len(changed) > MAX_REPORTED or len(removed) > MAX_REPORTED
        return {"event": "workdir_changed", "changed": changed[:MAX_REPORTED],
                "removed": sorted(removed)[:MAX_REPORTED], "truncated": bool(truncated or more)}
