"""``%smolvm push`` / ``%smolvm pull``: copy files between the notebook's folder and the VM.

Host paths are confined to one folder (the notebook's: the kernel's working
directory), symlinks resolved; guest paths are confined by the guest agent to
the guest user's home and /tmp. Sizes are checked on both sides before
anything is written, and a pulled file appears on the host whole or not at
all (written to a temporary name, then renamed). An existing host file is
not overwritten unless asked.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

from smolvm_kernel.errors import GuestFileError, SmolVMError
from smolvm_kernel.vm.workdir import size_words as _size


class TransferError(SmolVMError, PermissionError):
    """A push or pull that was refused before anything moved."""


def confine(root: str | os.PathLike, path: str) -> Path:
    """``path`` (relative to ``root`` or absolute) resolved; refused unless inside ``root``."""
    if not path or "\x00" in path:
        raise TransferError(f"{path!r} is not a usable path")
    base = Path(root).resolve()
    full = (base / os.path.expanduser(path)).resolve()
    if full != base and base not in full.parents:
        raise TransferError(f"{path!r} is outside the notebook's folder {base}; "
                            f"only files under it can be pushed or pulled")
    return full


def confine_writable(root: str | os.PathLike, path: Path) -> Path:
    """A pull's destination: under ``root`` and in no hidden folder or file.
    Hidden places in a home folder hold what runs on the host (kernelspecs in
    ~/.local/share/jupyter, ~/.jupyter config, shell start-up files): a file
    out of the VM must not land there, as Jupyter's contents API refuses them
    too (ContentsManager.allow_hidden)."""
    base = Path(root).resolve()
    rel = path.relative_to(base)
    if any(part.startswith(".") for part in rel.parts):
        raise TransferError(f"{str(rel)!r} is or is in a hidden file or folder; a file from the VM is not "
                            f"written there (such places hold configuration the host runs): pull to "
                            f"another name")
    return path


def push(sandbox, root: str | os.PathLike, local: str, remote: str | None, limit: int) -> str:
    """Copy ``local`` (under ``root``) into the VM; returns a one-line summary."""
    src = confine(root, local)
    if not src.is_file():
        raise TransferError(f"{local!r} is not a file in {Path(root).resolve()}")
    size = src.stat().st_size
    if size > limit:
        raise TransferError(f"{local!r} is {_size(size)}, over the {_size(limit)} push limit "
                            f"(SandboxConfig.max_transfer_mib)")
    target = remote or src.name
    if target.endswith("/"):
        target = posixpath.join(target, src.name)
    sent = sandbox.put_file(src.read_bytes(), target)
    return f"pushed {src.name} ({_size(sent)}) to the VM as {_guest_display(target)}"


def pull(sandbox, root: str | os.PathLike, remote: str, local: str | None, limit: int,
         overwrite: bool = False) -> str:
    """Copy ``remote`` out of the VM into ``root``; returns a one-line summary."""
    name = posixpath.basename(remote.rstrip("/"))
    if not name:
        raise TransferError(f"{remote!r} names no file")
    dest = confine(root, local or name)
    if dest.is_dir():
        dest = confine(root, str(dest / name))
    confine_writable(root, dest)
    exists = dest.exists() and not overwrite
    if exists and not dest.is_file():
        raise TransferError(f"{dest} exists; pull to another name or add --force to replace it")
    try:
        data = sandbox.get_file(remote, max_bytes=limit)
    except GuestFileError:
        raise
    except SmolVMError as exc:
        raise GuestFileError(f"cannot read {remote!r} in the VM: {exc}") from None
    if len(data) > limit:   # the guest's size claim is not trusted
        raise GuestFileError(f"{remote!r} is over the {_size(limit)} pull limit")
    if exists:
        # The working folder's write-back may have brought it already (vm/workdir.py).
        if dest.stat().st_size == len(data) and dest.read_bytes() == data:
            return f"{dest} is already the VM's {_guest_display(remote)} ({_size(len(data))})"
        raise TransferError(f"{dest} exists; pull to another name or add --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return f"pulled {_guest_display(remote)} ({_size(len(data))}) to {dest}"


def check(root: str | os.PathLike, line) -> Path:
    """The host path of a push or pull line (a hostline.HostLine), confined to
    ``root``, checked before anything waits on the VM."""
    if line.command == "push":
        return confine(root, line.source)
    return confine(root, line.destination or os.path.basename(line.source.rstrip("/")) or ".")


def run(sandbox, root: str | os.PathLike, line, limit: int) -> str:
    """Carry out a push or pull line between ``root`` and ``sandbox``; what to print."""
    if line.command == "push":
        return push(sandbox, root, line.source, line.destination, limit)
    return pull(sandbox, root, line.source, line.destination, limit, overwrite=line.force)


def _guest_display(path: str) -> str:
    return path if path.startswith(("/", "~")) else f"~/{path}"
