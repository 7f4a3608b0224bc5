"""The notebook's folder as the VM's working folder: copied in, changes copied back.

When a VM starts, the files of the host folder (the kernel's working
directory: the notebook's folder) are copied into the guest user's home, the
guest kernel's working directory, so that ``pd.read_csv('data/x.csv')`` and
``import helper`` beside the notebook work as under a local kernel. What is
copied, and the limits (:class:`Limits`): regular files only, no hidden file
or folder (``.git``, ``.ipynb_checkpoints``, ``.env``), no link, device or
FIFO, no ``__pycache__``; at most 256 MiB, 2,000 files and 64 MiB a file.
What a limit leaves out is named in the first cell.

In ``read-write`` mode the agent reports, at the end of each cell, the files
in the home folder that are new or changed (guest/workdir.py), and the host
copies them back here, on a thread of its own while the next cell runs. The
host does the writing, by these rules, because nothing the guest writes may
run on the host without a person's explicit act:

* confined to the folder: every component opened with ``O_NOFOLLOW``
  relative to the folder's descriptor taken at the start; never through or
  over a link, never a hidden name, never over a folder;
* written whole or not at all (a hidden temporary name, then a rename),
  mode 0644 (never executable), at most 64 MiB a file and 256 MiB in all
  per VM;
* refused, and said so in the cell, with how to copy one deliberately
  (``%smolvm pull``): Python modules, packages and extensions (``*.py``,
  ``*.pth``, ``*.so``, anything in a folder with ``__init__.py``), which
  ``import`` would run on the host; shell scripts and other programs;
  files named like a start-up, build or configuration file (``Makefile``,
  ``pyproject.toml``, ``conftest.py``, ``requirements.txt``, ``postBuild``,
  ``jupyter_*config*``, nbconvert templates ...), which a tool run in the
  folder would read and act on; and any notebook already in the folder,
  which a frontend has open and saves;
* a file changed on both sides since the VM started: the folder's copy is
  kept and the VM's is written beside it as ``NAME (VM).EXT``.

A file deleted in the VM is not deleted here. ``read-only`` copies in and
brings nothing back; ``off`` does neither.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import queue
import re
import stat
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from smolvm_kernel.vm.guest_news import agent_event

log = logging.getLogger("smolvm_kernel.workdir")

MODES = ("read-write", "read-only", "off")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Raw bytes in one ``workdir_put`` request (base64 makes it 4/3 as large on the wire).
BATCH_BYTES = 4 * 1024 * 1024
_GET_CHUNK = 4 * 1024 * 1024
#: Entries looked at in the host folder before the copy-in stops looking.
MAX_SCANNED = 50000
_SKIPPED_DIRS = frozenset({"__pycache__"})

#: Files named so are read and acted on by tools run in the folder (or are
#: code): they stay in the VM. Lower-case comparison.
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyx", ".pxd", ".pyi", ".pth", ".so", ".pyd", ".dylib",
                  ".dll", ".egg", ".whl", ".sh", ".bash", ".zsh", ".fish", ".csh", ".bat", ".cmd", ".ps1",
                  ".exe", ".desktop", ".service", ".j2", ".jinja", ".jinja2", ".tpl")
_CONFIG_NAMES = frozenset({
    "makefile", "gnumakefile", "pyproject.toml", "setup.cfg", "tox.ini", "pytest.ini", "noxfile.py",
    "requirements.txt", "environment.yml", "environment.yaml", "apt.txt", "postbuild", "start",
    "runtime.txt", "dockerfile", "install.r", "project.toml", "pipfile", "pipfile.lock", "conf.json",
    "custom.js", "custom.css", "package.json", "sitecustomize", "usercustomize", "manifest.in",
})
_CONFIG_PATTERN = re.compile(r"^(jupyter|ipython|nbconvert|jupyterlab|jupyter_server|notebook)[_-].*(config|settings)"
                             r"|_config\.(json|py|toml|ya?ml)$|\.so\.\d")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the copy-in takes and the write-back gives, at most."""

    total_bytes: int = 256 * 1024 * 1024
    files: int = 2000
    file_bytes: int = 64 * 1024 * 1024
    #: Written back into the folder over one VM's life.
    writeback_bytes: int = 256 * 1024 * 1024


@dataclasses.dataclass
class CopyIn:
    """What the start copied in, and what it left out (path, why)."""

    files: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    left_out: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    total_bytes: int = 0
    seconds: float = 0.0

    def note(self) -> str:
        """The first cell's line when something was left out ("" otherwise)."""
        if not self.left_out:
            return ""
        shown = ", ".join(f"{path} ({why})" for path, why in self.left_out[:6])
        more = f" and {len(self.left_out) - 6} more" if len(self.left_out) > 6 else ""
        return (f"[smolvm] the notebook's folder was copied into the VM ({len(self.files)} files, "
                f"{size_words(self.total_bytes)}), but {len(self.left_out)} were left out: {shown}{more}. "
                f"Copy one in with %smolvm push NAME.\n")


def valid_relative(rel: object) -> bool:
    """A path the guest may name: relative, normalised, no hidden part, no NUL."""
    if not isinstance(rel, str) or not rel or len(rel) > 4096 or "\x00" in rel:
        return False
    parts = rel.split("/")
    if len(parts) > 16:
        return False
    try:
        return all(p not in ("", ".", "..") and not p.startswith(".") and len(os.fsencode(p)) <= 255
                   for p in parts)
    except UnicodeError:
        return False


def refusal(rel: str, is_package: Callable[[str], bool]) -> str | None:
    """Why a file the VM wrote stays in the VM (None: it may come back).
    ``is_package(folder)``: whether that folder holds an ``__init__.py``."""
    name = rel.rsplit("/", 1)[-1].lower()
    if name.endswith(_CODE_SUFFIXES) or name == "__init__.py":
        return "code: it would run on the host if imported or started there"
    if name in _CONFIG_NAMES or _CONFIG_PATTERN.search(name):
        return "named like a build, start-up or configuration file that a tool run here would act on"
    parts = rel.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        if is_package("/".join(parts[:depth])):
            return "in a Python package folder (it has __init__.py): importing it would run code here"
    return None


def plan(root: Path, limits: Limits) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """The files to copy in (breadth first, by name) and those a limit leaves out."""
    take: list[tuple[str, int]] = []
    left: list[tuple[str, str]] = []
    total, seen = 0, 0
    level = [""]
    while level:
        deeper = []
        for prefix in level:
            try:
                entries = sorted(os.scandir(root / prefix if prefix else root), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                seen += 1
                if seen > MAX_SCANNED:
                    left.append((prefix or ".", f"the folder has over {MAX_SCANNED} entries; the rest "
                                                "was not looked at"))
                    return take, left
                if entry.name.startswith(".") or entry.is_symlink():
                    continue
                rel = prefix + entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if entry.name not in _SKIPPED_DIRS and rel.count("/") < 15:
                        deeper.append(rel + "/")
                elif stat.S_ISREG(st.st_mode):
                    if st.st_size > limits.file_bytes:
                        left.append((rel, f"{size_words(st.st_size)}, over the {size_words(limits.file_bytes)} "
                                          f"a file"))
                    elif len(take) >= limits.files:
                        left.append((rel, f"over the {limits.files}-file limit"))
                    elif total + st.st_size > limits.total_bytes:
                        left.append((rel, f"over the {size_words(limits.total_bytes)} in all"))
                    else:
                        take.append((rel, st.st_size))
                        total += st.st_size
        level = deeper
    return take, left


class Workdir:
    """One VM's copy of a host folder: the copy-in, the write-back, the notes.

    The copy-in is :meth:`prepare`'s :attr:`requests`, which the Sandbox
    sends as soon as the agent has said hello, while the guest kernel takes
    its new key: the agent handles requests in order, before any cell the
    host sends after them, so the first cell finds the files there.
    ``request(op, **fields)`` runs one agent op and returns its reply (any
    thread but the event loop's); ``get_file(path, max_bytes)`` reads a
    file from the guest's home; ``notice(text)`` puts a line in the
    running cell(s)."""

    def __init__(self, root: str | os.PathLike, mode: str, *, request: Callable[..., dict],
                 get_file: Callable[[str, int], bytes], notice: Callable[[str], None],
                 limits: Limits | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"workdir_mode={mode!r}; choose one of {', '.join(MODES)}")
        self.root = Path(root).resolve()
        self.mode = mode
        self.limits = limits or Limits()
        self._request = request
        #: The copy-in's agent requests (``op`` and its fields), made by prepare().
        self.requests: list[dict] = []
        self._get_file = get_file
        self._notice = notice
        self._fd = os.open(self.root, _DIR_FLAGS)
        #: The host file's (size, mtime_ns) when copied in or last written back.
        self._known: dict[str, tuple[int, int]] = {}
        #: Paths the guest has (as far as its reports tell): for the package rule.
        self._guest: set[str] = set()
        self._told: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self.written_bytes = 0
        self.written: list[str] = []
        self.copy_in: CopyIn | None = None

    # -- at the start

    def prepare(self) -> CopyIn:
        """Read the folder into the copy-in's requests (a worker thread, while
        the VM is restored); :attr:`requests` then holds them, in order."""
        t0 = time.monotonic()
        files, left = plan(self.root, self.limits)
        result = CopyIn(left_out=left)
        batch, size = [], 0
        requests: list[dict] = []
        for rel, _ in files:
            data = self._read_host(rel)
            if data is None:
                result.left_out.append((rel, "changed or unreadable while copied"))
                continue
            result.files.append((rel, len(data)))
            result.total_bytes += len(data)
            self._guest.add(rel)
            for offset in range(0, max(len(data), 1), BATCH_BYTES):
                chunk = data[offset:offset + BATCH_BYTES]
                if batch and size + len(chunk) > BATCH_BYTES:
                    requests.append({"op": "workdir_put", "files": batch, "watch": False})
                    batch, size = [], 0
                item = {"path": rel, "offset": offset, "size": len(data)}
                size += len(chunk)
                packed = zlib.compress(chunk, 1) if len(chunk) >= 4096 else chunk
                if len(packed) < len(chunk) * 0.9:   # data files and notebooks shrink; the channel is the cost
                    item["z"], chunk = True, packed
                item["data"] = base64.b64encode(chunk).decode()
                batch.append(item)
        watch = self.mode == "read-write"
        if batch:
            requests.append({"op": "workdir_put", "files": batch, "watch": watch})
        elif watch:
            requests.append({"op": "workdir_watch"})
        self.requests = requests
        result.seconds = time.monotonic() - t0
        self.copy_in = result
        return result

    def _read_host(self, rel: str) -> bytes | None:
        """The host file's bytes, reached without following a link; its
        figures are remembered (to tell a change made here later)."""
        try:
            dfd = self._walk(rel.split("/")[:-1], create=False)
        except OSError:
            return None
        try:
            fd = os.open(rel.rsplit("/", 1)[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError:
            return None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.limits.file_bytes:
                return None
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(self.limits.file_bytes + 1)
            if len(data) != st.st_size:
                return None
            self._known[rel] = (st.st_size, st.st_mtime_ns)
            return data
        finally:
            os.close(fd)

    # -- after each cell

    def changed(self, changed: tuple[tuple[str, int], ...], removed: tuple[str, ...], truncated: bool) -> None:
        """The agent's report (already type-checked, guest_news.py): decide
        each file by the rules now, say the refusals in the running cell, and
        queue the copies for the worker. Called on the I/O thread."""
        if self.mode != "read-write":
            return
        notes: list[str] = []
        conflicts: list[str] = []
        with self._lock:
            for rel in removed:
                self._guest.discard(rel)
            for rel, _ in changed:
                if valid_relative(rel):
                    self._guest.add(rel)
            for rel, size in changed:
                why = self._decide(rel, size)
                if isinstance(why, tuple):        # (target, conflict note or "")
                    target, note = why
                    self._jobs.put((rel, target, size))
                    if note:
                        conflicts.append(note)
                elif why and (rel, why) not in self._told:
                    self._told.add((rel, why))
                    notes.append(f"{rel}: {why}")
            if truncated and ("", "truncated") not in self._told:
                self._told.add(("", "truncated"))
                notes.append("the VM's folder holds more files than one report names; some were not copied")
        if notes:
            self._notice(_refusal_note(notes))
        if conflicts:
            self._notice("".join(f"[smolvm] {line}\n" for line in conflicts))
        if not self._jobs.empty():
            self._ensure_worker()

    def _decide(self, rel: str, size: int):
        """A (target, note) to copy ``rel`` to, or the reason it stays in the VM."""
        if not valid_relative(rel):
            return "not a plain visible path inside the folder"
        why = refusal(rel, self._is_package)
        if why:
            return why
        if size > self.limits.file_bytes:
            return f"{size_words(size)}, over the {size_words(self.limits.file_bytes)} a file comes back"
        current = self._host_figures(rel)
        if current == "other":
            return "the folder has a link, folder or other non-file under that name"
        if rel.lower().endswith(".ipynb") and current is not None:
            return "a notebook in the folder is never overwritten from the VM (a frontend has it open)"
        if current is None or current == self._known.get(rel):
            return (rel, "")
        target = _conflict_name(rel)
        if not valid_relative(target) or self._host_figures(target) == "other":
            return "changed both in the folder and in the VM; the folder's copy was kept"
        return (target, f"{rel}: changed both in the folder and in the VM; the folder's copy was kept and "
                        f"the VM's is saved as {target}")

    def _is_package(self, folder: str) -> bool:
        init = f"{folder}/__init__.py"
        return init in self._guest or self._host_figures(init) is not None

    def _host_figures(self, rel: str):
        """(size, mtime_ns) of the host file, None if there is none, "other" if not a regular file."""
        parts = rel.split("/")
        try:
            dfd = self._walk(parts[:-1], create=False)
        except FileNotFoundError:
            return None
        except OSError:
            return "other"
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError:
            return "other"
        finally:
            os.close(dfd)
        return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else "other"

    # -- the copies back

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="smolvm-workdir", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            try:
                rel, target, size = self._jobs.get(timeout=2.0)
            except queue.Empty:
                return
            try:
                self._copy_back(rel, target, size)
            except Exception as exc:   # a VM gone, a file removed meanwhile: the next report retries
                log.info("write-back of %s failed: %s", rel, exc)
            finally:
                self._jobs.task_done()

    def _copy_back(self, rel: str, target: str, size: int) -> None:
        room = self.limits.writeback_bytes - self.written_bytes
        if size > room:
            self._tell_once(rel, "over the write-back limit of this VM "
                                 f"({size_words(self.limits.writeback_bytes)}); pull it with %smolvm pull")
            return
        data = self._get_file(rel, min(self.limits.file_bytes, room))
        if len(data) > min(self.limits.file_bytes, room):       # the guest's size is not trusted
            return
        with self._lock:
            current = self._host_figures(target)
            if current == "other":
                return
            if target == rel and current is not None and current != self._known.get(rel):
                # Changed here while the copy was on its way: decided again at the next report.
                return
            self._write(target, data)
        self.written_bytes += len(data)
        self.written.append(target)

    def _tell_once(self, rel: str, why: str) -> None:
        if (rel, why) not in self._told:
            self._told.add((rel, why))
            self._notice(_refusal_note([f"{rel}: {why}"]))

    def _write(self, rel: str, data: bytes) -> None:
        """Write ``rel`` whole, under the folder, through no link (the lock is held)."""
        parts = rel.split("/")
        dfd = self._walk(parts[:-1], create=True)
        tmp = f".{parts[-1][:200]}.smolvm-{os.getpid()}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            try:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise PermissionError(f"{rel} is not a regular file in the folder")
            except FileNotFoundError:
                pass
            os.rename(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            self._known[rel] = (st.st_size, st.st_mtime_ns)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        finally:
            os.close(dfd)

    def _walk(self, folders: list[str], create: bool) -> int:
        """A descriptor of the folder ``folders`` under the root, no link followed."""
        fd = os.dup(self._fd)
        try:
            for name in folders:
                if create:
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    # -- at the stop

    def finish(self, timeout: float = 30.0) -> None:
        """Before the VM goes: one last report, and wait for the copies."""
        if self.mode == "read-write":
            try:
                news = self._request("workdir_scan")
                changed = news.get("changed")
                if isinstance(changed, list):
                    parsed = agent_event({"event": "workdir_changed", "changed": changed,
                                          "removed": news.get("removed", []),
                                          "truncated": news.get("truncated")}, 0, 0)
                    if parsed is not None and parsed.workdir is not None:
                        self.changed(*parsed.workdir)
            except Exception as exc:   # the VM may already be gone
                log.info("the last look at the VM's folder failed: %s", exc)
        deadline = time.monotonic() + timeout
        while self._jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _conflict_name(rel: str) -> str:
    folder, _, name = rel.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    new = f"{stem} (VM).{ext}" if dot and stem else f"{name} (VM)"
    return f"{folder}/{new}" if folder else new


def _refusal_note(lines: list[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:12])
    more = f"\n  ... and {len(lines) - 12} more" if len(lines) > 12 else ""
    return (f"[smolvm] not copied back to the notebook's folder (they stay in the VM; copy one "
            f"deliberately with %smolvm pull NAME):\n{shown}{more}\n")


def size_words(n: float) -> str:
    """``n`` bytes as a person reads them: 512 bytes, 3.0 KiB, 1.5 MiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
