"""The audit log: one JSON object per line for each thing a VM's owner should be able to account for.

Who started which VM with what shape and network, when it stopped and why it
died, every file pushed or pulled with its size, every setting refused by a
limit or the instructor's policy. One file per host when the instructor's
policy names it (``audit_log``), else one per user in the state folder;
rotated by size, so it never fills a disk.

    {"ts": "2026-12-03T23:55:01.123Z", "host": "lab1", "user": "ana", "uid": 1001,
     "pid": 4242, "event": "start", "vm_id": "c9d1f0de", "kernel_id": "…",
     "profile": "base", "vcpus": 2, "mem_mib": 512, "disk_mib": 2048,
     "network": "none", "backend": "qemu", "accel": "tcg", "boot_s": 0.61}

Events: ``start``, ``stop``, ``death`` (``cause``), ``reset``, ``push`` and
``pull`` (``path``, ``bytes``), ``refused`` (``what``, ``why``), ``pause``,
``resume``, ``culled``. Writing never raises into the caller: an audit log
that cannot be written is reported once on the logger, and the VM goes on.

Under the host's admission service (hostd.py) the kernels' events reach the
log through it: it writes them with the uid it saw and ``"by": "user"``, only
the names and fields above, size-capped and rate-limited; its own entries
(``admit``, ``release``, ``refused`` for an admission, ``events_dropped``)
say ``"by": "hostd"`` and are also written to ``<name>-hostd.jsonl`` beside
the log (audit-hostd.jsonl), which no user's event reaches: users cannot
rotate them away.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import pwd
import socket
import threading
from pathlib import Path

log = logging.getLogger("smolvm_kernel.host.audit")

#: Past this size the log is rotated (audit.jsonl -> audit.jsonl.1 -> ... .N).
MAX_BYTES = 16 * 1024 * 1024
BACKUPS = 5
#: One line holds at most this much (a path is cut, never the line's JSON).
_MAX_FIELD = 4096


class AuditLog:
    def __init__(self, path: str | os.PathLike, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        self._failed = False
        uid = os.geteuid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        self._who = {"host": socket.gethostname(), "user": user, "uid": uid, "pid": os.getpid()}

    def record(self, event: str, **fields) -> None:
        """Append one event; never raises."""
        now = datetime.datetime.now(datetime.timezone.utc)
        entry = {"ts": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
                 **self._who, "event": event,
                 **{k: _clip(v) for k, v in fields.items() if v is not None}}
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8", "backslashreplace")
        try:
            with self._lock:
                self._append(line)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot write the audit log %s: %s", self.path, exc)

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One lock file per log, across processes: rotation and appends never interleave.
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_size + len(line) > self.max_bytes:
                    self._rotate()
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        finally:
            os.close(lock_fd)

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = Path(f"{self.path}.{i}")
            if older.exists():
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def read(self) -> list[dict]:
        """Every event in the current file, oldest first (for tests and `smolvm-kernel audit`)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _clip(value):
    if isinstance(value, str) and len(value) > _MAX_FIELD:
        return value[:_MAX_FIELD] + "…"
    return value


def default_path() -> Path:
    """Where this user's kernels log without an instructor's policy."""
    from smolvm_kernel.paths import state_dir

    return state_dir() / "audit.jsonl"
