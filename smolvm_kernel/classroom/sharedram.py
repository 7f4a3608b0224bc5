"""One sealed copy of a ready snapshot's guest RAM per course image, for every student.

A fork maps its snapshot's RAM file private (copy-on-write), but QEMU 7.2's
``memory-backend-file`` opens ``mem-path`` for writing even with ``share=off``
(``readonly=on`` makes guest RAM a ROM there; ``rom=off`` comes with 8.2), so
a student could not map the root-owned shared ``ram.bin`` and forked from a
copy of their own: one copy per student on disk and in the page cache.

hostd (root) instead fills a memfd with the shared seed's ``ram.bin`` once
per snapshot key (only its non-zero data: the file stays as sparse as the
guest's used memory), seals it against every write, growth and shrink
(F_SEAL_WRITE|GROW|SHRINK|SEAL), and hands it to a granted caller over its
socket (SCM_RIGHTS). The student's QEMU opens ``/proc/self/fd/N`` read-write
(a memfd's mode is 0777) and maps it MAP_PRIVATE: the guest's writes go into
that QEMU's own anonymous memory; a write, a hole punch, a truncate or a
shared writable map of the memfd fails with EPERM for anyone, root included.

Cost: the memfd's pages are shared memory charged to hostd (its cgroup), one
copy per course image: the used part of the guest's RAM at the snapshot
(184 MiB of a 512 MiB base guest, measured), not per student.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
from pathlib import Path

log = logging.getLogger("smolvm_kernel.classroom.sharedram")

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
KEY_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 16


def sealed_copy(path: Path, name: str) -> int:
    """A sealed memfd with ``path``'s content (same size; holes and all-zero
    64 KiB chunks are not written, so they take no memory)."""
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size = os.fstat(src).st_size
        os.ftruncate(fd, size)
        zero = bytes(_CHUNK)
        off = 0
        while off < size:
            try:
                data = os.lseek(src, off, os.SEEK_DATA)
            except OSError:       # ENXIO: no data after off
                break
            hole = os.lseek(src, data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                chunk = os.pread(src, min(_CHUNK, hole - pos), pos)
                if not chunk:
                    break
                if chunk != zero[:len(chunk)]:
                    os.pwrite(fd, chunk, pos)
                pos += len(chunk)
            off = hole
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.close(src)
    return fd


def _root_only(st: os.stat_result, owner: int = 0) -> bool:
    """Owned by root (``owner``) and writable by no one else."""
    return st.st_uid == owner and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class SharedRAM:
    """hostd's sealed memfds, one per ready-snapshot key found in the seed folder."""

    def __init__(self, seeds: Path | None, owner: int = 0) -> None:
        self.seeds, self.owner = seeds, owner
        #: key -> (fd, identity of the ram.bin it was filled from)
        self.fds: dict[str, tuple[int, tuple]] = {}

    def find(self, key: str) -> Path | None:
        """The seed folder's ram.bin of the snapshot ``key``, if the folder, the
        snapshot's folder and the file are root's and writable by no one else."""
        if self.seeds is None or not isinstance(key, str) or not KEY_RE.fullmatch(key):
            return None
        try:
            if not _root_only(os.stat(self.seeds), self.owner):
                return None
            for d in os.scandir(self.seeds):
                if d.name.startswith(".") or not d.is_dir(follow_symlinks=False):
                    continue
                if not d.name.endswith("-" + key[:16]):
                    continue
                manifest = Path(d.path) / "manifest.json"
                if json.loads(manifest.read_text()).get("key") != key:
                    continue
                ram = Path(d.path) / "ram.bin"
                st = os.lstat(ram)
                if (_root_only(os.lstat(d.path), self.owner) and stat.S_ISREG(st.st_mode)
                        and _root_only(st, self.owner)):
                    return ram
        except (OSError, ValueError, AttributeError):
            return None
        return None

    def get(self, key: str) -> int | None:
        """The sealed memfd of snapshot ``key`` (hostd's own descriptor: send a
        copy, keep it), made on first use; None if the seed folder has no such
        snapshot. A seed that changed since gets a fresh memfd; the old one is
        closed (forks that map it keep their mapping)."""
        ram = self.find(key)
        if ram is None:
            self.forget(key)
            return None
        st = os.stat(ram)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        have = self.fds.get(key)
        if have is not None and have[1] == ident:
            return have[0]
        self.forget(key)
        fd = sealed_copy(ram, f"smolvm-ram-{key[:16]}")
        self.fds[key] = (fd, ident)
        log.info("hostd: guest RAM of snapshot %s shared from a sealed memfd (%d MiB in memory)",
                 key[:16], os.fstat(fd).st_blocks * 512 >> 20)
        return fd

    def forget(self, key: str) -> None:
        have = self.fds.pop(key, None)
        if have is not None:
            os.close(have[0])

    def prune(self) -> None:
        """Close the memfds of snapshots no longer in the seed folder."""
        for key in [k for k in self.fds if self.find(k) is None]:
            self.forget(key)

    def close(self) -> None:
        for key in list(self.fds):
            self.forget(key)

    def memory_bytes(self) -> int:
        total = 0
        for fd, _ in self.fds.values():
            try:
                total += os.fstat(fd).st_blocks * 512
            except OSError:
                pass
        return total
