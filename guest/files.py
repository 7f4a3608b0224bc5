"""Files in and out of the VM (``%smolvm push/pull``, ``Sandbox.put_file/get_file``).

The agent runs as root; the paths come from the host but name places that
the guest's user controls, and that user's code can swap a directory for a
symbolic link at any moment. So every file operation here runs in a forked
child that has become the kernel's user (it can do nothing the user's own
code could not), walks the path one component at a time from an allowed root
without following any symbolic link (``O_NOFOLLOW`` on each ``openat``),
opens only regular files (``O_NONBLOCK``, so a FIFO cannot hold it), writes
to a temporary file that is renamed into place once complete, and is killed
if it takes longer than :data:`DEADLINE_S`.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import stat

#: A file operation (one chunk of at most a few MiB) that takes longer is stuck.
DEADLINE_S = 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(PermissionError):
    """The path is not one the guest's user may use here."""


def split_beneath(path: str, home: str, roots: tuple[str, ...]) -> tuple[str, list[str]]:
    """The allowed root ``path`` lies in and its components below it (lexically:
    no ``..`` may climb out; links are dealt with by the walk, not here)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError("a path is required")
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]         # the guest user's home, as in a shell
    full = os.path.normpath(os.path.join(home, path))
    for root in roots:
        if full.startswith(root.rstrip("/") + "/"):
            parts = full[len(root.rstrip("/")) + 1:].split("/")
            if parts and all(p not in ("", ".", "..") for p in parts):
                return root, parts
    raise Refused(f"{path!r} is outside {' and '.join(roots)}")


def _walk(root: str, parts: list[str], create: bool, owner: tuple[int, int] | None = None) -> int:
    """An fd of the directory that holds ``parts[-1]``; no link is followed."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for name in parts[:-1]:
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                    if owner is not None:
                        os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise Refused(f"{name!r} is not a directory the file can be reached through "
                              f"(symbolic links are not followed; paths stay inside {root}): "
                              f"{exc.strerror}") from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def put(root: str, parts: list[str], data: bytes, offset: int, total: int | None,
        owner: tuple[int, int] | None = None) -> int:
    """Write ``data`` at ``offset`` of the file; it appears under its name once
    ``total`` bytes are written (None: this chunk is the whole file).
    ``owner``: the (uid, gid) that new folders and the file are given (only
    for the agent writing as root, see :func:`put_many`)."""
    dfd = _walk(root, parts, create=True, owner=owner)
    name, part = parts[-1], f".{parts[-1]}.smolvm-part"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if offset == 0 else 0)
        try:
            fd = os.open(part, flags, 0o644, dir_fd=dfd)
        except OSError as exc:
            raise Refused(f"cannot write {name!r}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Refused(f"{name!r} is not a regular file")
            if owner is not None:
                os.fchown(fd, *owner)
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        end = offset + len(data)
        if total is None or end >= total:
            os.rename(part, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return end
    finally:
        os.close(dfd)


def put_many(chunks: list, owner: tuple[int, int] | None = None) -> int:
    """Several :func:`put` calls (a folder's small files in one request):
    ``chunks`` holds (root, parts, data, offset, total) tuples.

    Run as the user in a child (:func:`as_user`), or, with ``owner``, by the
    agent itself as root, which only the start's copy of the notebook folder
    does, before the host has sent the kernel anything: no code but the
    agent's own has run in the VM then (it was restored from a snapshot, or
    booted), so nothing can have swapped a folder for a link. The walk still
    follows no link, and what it makes is the user's."""
    for root, parts, data, offset, total in chunks:
        put(root, parts, data, offset, total, owner)
    return len(chunks)


def get(root: str, parts: list[str], offset: int, length: int, max_size: int) -> tuple[int, bytes]:
    """The file's size and ``length`` bytes from ``offset``; only a regular file."""
    dfd = _walk(root, parts, create=False)
    try:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            raise Refused(f"cannot read {parts[-1]!r}: {exc.strerror} (symbolic links are not followed)") \
                from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{parts[-1]!r} is not a regular file")
        if st.st_size > max_size:
            raise ValueError(f"{parts[-1]} is {st.st_size} bytes; files are limited to {max_size} bytes")
        return st.st_size, os.pread(fd, length, offset)
    finally:
        os.close(fd)


def as_user(uid: int, gid: int, fn, *args):
    """``fn(*args)`` in a forked child that is ``uid``/``gid``; its result, or its error raised here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: no locks, no threads of the agent's are used here
        try:
            os.close(r)
            signal.alarm(DEADLINE_S)
            if os.getuid() != uid or os.getgid() != gid:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            out = marshal.dumps(("ok", fn(*args)))
        except BaseException as exc:   # noqa: BLE001 - everything goes back to the agent
            kind = "refused" if isinstance(exc, PermissionError) else type(exc).__name__
            out = marshal.dumps(("error", kind, str(exc)))
        try:
            view = memoryview(out)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], DEADLINE_S + 1)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"the file operation took longer than {DEADLINE_S} s")
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not chunks:
        raise TimeoutError(f"the file operation was stopped after {DEADLINE_S} s")
    result = marshal.loads(b"".join(chunks))
    if result[0] == "ok":
        return result[1]
    if result[1] == "refused":
        raise Refused(result[2])
    raise ValueError(result[2]) if result[1] == "ValueError" else OSError(result[2])
