"""Checkpoints: a live VM's whole state under a name, restored by any of its user's kernels.

A checkpoint is what a pause saves (pause.py), taken from a VM that goes on
running: its devices and memory (the QEMU migration stream the ready
snapshots use, written while the vCPUs are stopped) and a copy of its
scratch disk, plus a line of JSON about it. Restoring one loads it into a
fresh VMM in place of the kernel's VM; the agent then hands the guest
kernel a new key and reseeds its generators (guest/kernel_warmup.py: its
re-key thread takes a key for every restore), so a checkpoint restored
twice, or forked, is two VMs that share no key and no randomness.

A checkpoint belongs to the user, not to the kernel that took it: it lives
in the user's state folder (``<state>/checkpoints/NAME/``, 0700, its files
0600), survives its kernel, and is loaded only when that folder and every
file in it are the user's own and nobody else's to write
(:meth:`CheckpointStore.open`).

Forks share memory: before the first :func:`fork`, the stream is turned once
into a RAM file and a device-only state (:func:`materialize`, the layout of
a ready snapshot), which every fork maps privately; the page cache holds
the checkpoint's memory once.

Layout: ``NAME/{state.bin, scratch.img, meta.json}`` and, once forked,
``ram.bin`` (then ``state.bin`` holds the devices only).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from smolvm_kernel import paths
from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.vm.pause import why_not_saveable

log = logging.getLogger("smolvm_kernel.vm.checkpoints")

#: A checkpoint's name: a file name anyone can type, never a path.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The names the kernel gives the checkpoints it takes before each cell (undo).
UNDO_PREFIX = "undo-"
#: Bump when what a checkpoint holds changes.
FORMAT = 1


class CheckpointError(SmolVMError):
    """A checkpoint that cannot be taken, found, loaded or kept (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One saved state, as its meta.json describes it."""

    name: str
    directory: Path
    #: time.time() when it was taken.
    created: float
    #: The guest's execution count when it was taken (the cell it follows), if known.
    after_cell: int | None
    #: Bytes on disk (state, RAM file, the disk's allocated blocks).
    size: int
    #: What a restoring VM must match: image, VMM, accelerator, shape (snapshot.snapshot_key).
    shape_key: str
    profile: str
    vcpus: int
    mem_mib: int
    disk_mib: int
    save_s: float
    #: The saved VM's RAM block was "ram0" (see Load.ram_named).
    ram_named: bool = True

    @property
    def state(self) -> Path:
        return self.directory / "state.bin"

    @property
    def scratch(self) -> Path:
        return self.directory / "scratch.img"

    @property
    def ram_file(self) -> Path:
        return self.directory / "ram.bin"

    def load(self) -> Load:
        """What a VMM loads to restore this checkpoint (the RAM file once materialized)."""
        return Load(self.state, self.scratch, self.ram_file if self.ram_file.exists() else None,
                    ram_named=self.ram_named)

    @property
    def undo(self) -> bool:
        return self.name.startswith(UNDO_PREFIX)

    def shape(self) -> str:
        return f"the {self.profile} image, {self.vcpus} vCPU, {self.mem_mib} MiB, {self.disk_mib} MiB disk"

    def taken(self, now: float | None = None) -> str:
        """``12 min ago``."""
        return ago((now or time.time()) - self.created)

    def describe(self, now: float | None = None) -> str:
        """``'before-cleaning', taken 12 min ago after cell [14]``."""
        cell = f" after cell [{self.after_cell}]" if self.after_cell else ""
        return f"{self.name!r}, taken {self.taken(now)}{cell}"


@dataclasses.dataclass(frozen=True)
class Load:
    """What a VMM loads for a restore (QemuBackend's ``restore``): the state,
    a disk to copy, and the RAM file when the checkpoint has one (forks map it
    privately). A checkpoint's stream carries its RAM (saved with
    x-ignore-shared off); once materialized, the state is the devices' only."""

    state: Path
    scratch: Path
    ram: Path | None
    #: Whether the RAM block is QEMU's "ram0" (a memory backend's: a VM that
    #: came from a ready snapshot) rather than the machine's own; a stream
    #: loads only into a block of its name.
    ram_named: bool = True
    verb: str = "restoring microVM from a checkpoint"

    @property
    def ignore_shared(self) -> bool:
        return self.ram is not None


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise CheckpointError(f"{name!r} is not a checkpoint name: use letters, digits, '.', '_' and '-' "
                              f"(at most 64, starting with a letter or digit), e.g. before-cleaning")
    return name


def allocated(path: Path) -> int:
    """Bytes a file holds on disk (its holes excluded)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class CheckpointStore:
    """One user's checkpoints: list, find, take room for, remove.

    ``max_count`` and ``max_mib`` are the instructor's caps (None: no cap;
    ``max_count == 0``: checkpoints are off), ``whose`` names who set them.
    """

    def __init__(self, root: Path | None = None, *, max_count: int | None = None,
                 max_mib: int | None = None, whose: str = "") -> None:
        self.root = root or paths.state_dir() / "checkpoints"
        self.max_count = max_count
        self.max_mib = max_mib
        self.whose = whose

    @classmethod
    def for_policy(cls, policy) -> CheckpointStore:
        if policy is None:
            return cls()
        return cls(max_count=policy.max_checkpoints, max_mib=policy.max_checkpoint_mib, whose=policy.whose)

    # -- reading

    def list(self) -> list[Checkpoint]:
        """Every complete checkpoint that is this user's own, oldest first."""
        if not self._root_ok():
            return []
        found = []
        for entry in sorted(os.listdir(self.root)):
            if NAME_RE.fullmatch(entry):
                try:
                    found.append(self.open(entry))
                except CheckpointError:
                    continue
        return sorted(found, key=lambda c: c.created)

    def open(self, name: str) -> Checkpoint:
        """The checkpoint ``name``, checked: the folder and its files are this
        user's and nobody else may write them (a checkpoint another user could
        have written is never loaded)."""
        check_name(name)
        if not self._root_ok():
            raise CheckpointError(f"there is no checkpoint {name!r} (none taken yet); "
                                  f"%smolvm checkpoints lists them")
        directory = self.root / name
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            have = ", ".join(c.name for c in self.list()) or "none"
            raise CheckpointError(f"there is no checkpoint {name!r} (yours: {have})") from None
        if not stat.S_ISDIR(st.st_mode) or not _owned(st):
            raise CheckpointError(f"the checkpoint folder {directory} is not a folder of yours that only "
                                  f"you can write: it is never loaded")
        for part in ("meta.json", "state.bin", "scratch.img", "ram.bin"):
            try:
                pst = os.lstat(directory / part)
            except FileNotFoundError:
                if part == "ram.bin":
                    continue
                raise CheckpointError(f"the checkpoint {name!r} is incomplete ({part} is missing); "
                                      f"remove it with %smolvm checkpoint --rm {name}") from None
            if not stat.S_ISREG(pst.st_mode) or not _owned(pst):
                raise CheckpointError(f"{directory / part} is not a file of yours that only you can write: "
                                      f"the checkpoint is never loaded")
        try:
            meta = json.loads((directory / "meta.json").read_text())
            if meta.get("format") != FORMAT or meta.get("name") != name:
                raise ValueError("another format")
            return Checkpoint(
                name=name, directory=directory, created=float(meta["created"]),
                after_cell=int(meta["after_cell"]) if meta.get("after_cell") is not None else None,
                size=sum(allocated(directory / p) for p in ("state.bin", "scratch.img", "ram.bin")),
                shape_key=str(meta["shape_key"]), profile=str(meta["profile"]), vcpus=int(meta["vcpus"]),
                mem_mib=int(meta["mem_mib"]), disk_mib=int(meta["disk_mib"]), save_s=float(meta["save_s"]),
                ram_named=meta.get("ram_named", True) is True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint {name!r} cannot be read ({exc}); remove it with "
                                  f"%smolvm checkpoint --rm {name}") from None

    def _root_ok(self) -> bool:
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode) or not _owned(st):
            raise CheckpointError(f"{self.root} is not a folder of yours that only you can write; "
                                  f"no checkpoint in it is used")
        return True

    # -- taking one

    def check_room(self, name: str) -> None:
        """Before a checkpoint is taken: the count cap (a name that exists is replaced)."""
        if self.max_count == 0:
            raise CheckpointError(f"checkpoints are switched off by {self.whose} (max_checkpoints = 0)")
        if self.max_count is not None:
            names = {c.name for c in self.list()}
            if name not in names and len(names) >= self.max_count:
                raise CheckpointError(
                    f"you have {len(names)} checkpoints, the most {self.whose} allows (max_checkpoints = "
                    f"{self.max_count}); remove one with %smolvm checkpoint --rm NAME")

    def begin(self) -> Path:
        """A private folder to write a new checkpoint into (commit() names it)."""
        root = paths.private_dir(self.root)
        return Path(tempfile.mkdtemp(prefix=".new-", dir=root))

    def commit(self, tmp: Path, name: str, meta: dict) -> Checkpoint:
        """Name the folder ``tmp`` (replacing a checkpoint of that name), after
        the size cap: over it, the new one is removed and refused."""
        meta = {"format": FORMAT, "name": name, **meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for part in tmp.iterdir():
            os.chmod(part, 0o600)
        size = sum(allocated(p) for p in tmp.iterdir())
        if self.max_mib is not None:
            others = sum(c.size for c in self.list() if c.name != name)
            if others + size > self.max_mib * 2**20:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(
                    f"this checkpoint ({size / 2**20:.0f} MiB) would bring yours to "
                    f"{(others + size) / 2**20:.0f} MiB, over the {self.max_mib} MiB {self.whose} allows "
                    f"(max_checkpoint_mib); remove one with %smolvm checkpoint --rm NAME")
        final = self.root / name
        with self.lock(name):
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=".old-", dir=self.root))
                os.rename(final, old / name)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        return self.open(name)

    def remove(self, name: str) -> int:
        """Remove a checkpoint; the bytes it freed. A VM forked from it keeps
        its mapping (the files go when the last user lets go)."""
        check_name(name)
        directory = self.root / name
        try:
            st = os.lstat(directory) if self._root_ok() else None
        except FileNotFoundError:
            st = None
        if st is None:
            have = ", ".join(c.name for c in self.list()) or "none"
            raise CheckpointError(f"there is no checkpoint {name!r} (yours: {have})")
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise CheckpointError(f"{directory} is not a checkpoint folder of yours; it was left as it is")
        with self.lock(name):      # an incomplete or unreadable one goes too
            size = sum(allocated(p) for p in directory.iterdir())
            shutil.rmtree(directory)
        return size

    def cleanup(self) -> list[Path]:
        """What dead processes left: half-written checkpoints (``.new-*``,
        ``.old-*``, ``.mat-*``) and undo steps whose kernel is gone (named
        checkpoints are the user's, kept until deleted)."""
        from smolvm_kernel.host.procs import process_alive

        removed = []
        if not self.root.is_dir():
            return removed
        for entry in self.root.iterdir():
            if entry.name.startswith((".new-", ".old-", ".mat-")) and entry.is_dir():
                if time.time() - entry.stat().st_mtime > 60:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
            elif entry.name.startswith(UNDO_PREFIX) and entry.is_dir() and not entry.is_symlink():
                try:
                    owner = json.loads((entry / "meta.json").read_text()).get("owner")
                except (OSError, ValueError):
                    owner = None
                if not (isinstance(owner, list) and len(owner) == 2 and process_alive(*owner)):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        return removed

    def lock(self, name: str, shared: bool = False):
        """The checkpoint's lock: a restore holds it shared while its VMM
        loads, a materialize or a removal exclusively."""
        return _Lock(paths.private_dir(self.root) / f".{name}.lock", shared)


class _Lock:
    def __init__(self, path: Path, shared: bool) -> None:
        self.path, self.shared = path, shared
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def _owned(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


# ---------------------------------------------------------------- the VMM's side

def save(qmp_socket: Path, scratch_disk: Path, into: Path) -> int:
    """Save a running VM into the folder ``into`` and let it run again (a
    thread's work: QMP is blocking). The vCPUs are stopped from the first byte
    of the state to the disk's copy, so memory and disk are of one instant;
    returns the state's size."""
    from smolvm_kernel.backends.base import copy_sparse
    from smolvm_kernel.backends.qmp import QMP

    with QMP(qmp_socket) as qmp:
        try:
            # x-ignore-shared off: the VM's RAM is a private map of a ready
            # snapshot's file (or anonymous): all of it goes in the stream.
            size = qmp.migrate_to_file(into / "state.bin", ignore_shared=False)
            copy_sparse(scratch_disk, into / "scratch.img")
        finally:
            # After a completed migration QEMU takes its disks back on "cont".
            qmp.execute("cont")
    return size


async def materialize(store: CheckpointStore, ck: Checkpoint, image, binary: str, shape: dict) -> Checkpoint:
    """Turn the checkpoint's stream into a RAM file plus a device-only state
    (a ready snapshot's layout), once: forks then map one RAM file privately
    instead of each loading its own copy. A VMM loads the stream into a shared
    RAM file without running the guest, and saves its devices."""
    import asyncio

    from smolvm_kernel.backends.base import VMSpec
    from smolvm_kernel.backends.qemu import QemuBackend

    lock = store.lock(ck.name)
    await asyncio.to_thread(lock.__enter__)
    try:
        ck = store.open(ck.name)
        if ck.ram_file.exists() or not ck.ram_named:
            return ck      # done; or a cold-booted VM's, whose RAM block no file backend can take
        tmp = Path(tempfile.mkdtemp(prefix=".mat-", dir=store.root))
        try:
            spec = VMSpec(vm_id="checkpoint", run_dir=tmp, image=image, ram_file=tmp / "ram.bin",
                          ram_shared=True, **{k: shape[k] for k in ("vcpus", "mem_mib", "disk_mib", "accel",
                                                                     "tsc_khz", "nic")})
            backend = QemuBackend(spec, binary, restore=ck.load(),
                                  drop_privileges=False, start_after_load=False)
            try:
                await backend.launch()
                await asyncio.to_thread(_save_devices, tmp / "qmp.sock", tmp / "devices.bin")
            finally:
                await backend.kill()
            os.chmod(tmp / "ram.bin", 0o600)
            os.rename(tmp / "ram.bin", ck.ram_file)
            os.rename(tmp / "devices.bin", ck.state)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return store.open(ck.name)
    finally:
        lock.__exit__()


def _save_devices(qmp_socket: Path, into: Path) -> int:
    from smolvm_kernel.backends.qmp import QMP

    with QMP(qmp_socket) as qmp:
        return qmp.migrate_to_file(into, ignore_shared=True)


# ---------------------------------------------------------------- for the Sandbox

def why_not_saved(machine, network: str) -> str | None:
    """Why this VM cannot be checkpointed (pause.why_not_saveable), or None."""
    if machine is None or machine.backend is None:
        return "no microVM runs: start one first"
    return why_not_saveable(machine.backend.name, machine.transport, network, "checkpointed")


async def take(machine, store: CheckpointStore, name: str, *, shape_key: str, profile: str,
               after_cell: int | None) -> Checkpoint:
    """Save the running ``machine`` as the checkpoint ``name`` (the loop's
    work; the VM is stopped for the save, then runs on)."""
    import asyncio

    check_name(name)
    store.check_room(name)
    spec = machine.backend.spec
    tmp = await asyncio.to_thread(store.begin)
    t0 = time.monotonic()
    try:
        await asyncio.to_thread(save, spec.run_dir / "qmp.sock", spec.scratch_disk, tmp)
    except (OSError, SmolVMError, ValueError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving the checkpoint {name!r} failed: {exc}") from None
    save_s = time.monotonic() - t0
    from smolvm_kernel.host.procs import this_process

    meta = {"created": time.time(), "after_cell": after_cell, "shape_key": shape_key, "profile": profile,
            "vcpus": spec.vcpus, "mem_mib": spec.mem_mib, "disk_mib": spec.disk_mib, "save_s": round(save_s, 3),
            "ram_named": spec.ram_file is not None or spec.ram_named,
            # an undo step is its kernel's: `cleanup` removes it once that process is gone
            **({"owner": list(this_process())} if name.startswith(UNDO_PREFIX) else {})}
    return await asyncio.to_thread(store.commit, tmp, name, meta)


def check_fits(ck: Checkpoint, image, binary: str, shape: dict) -> None:
    """A checkpoint loads only into a VM of its own image, VMM and shape
    (a boot.Plan's ``image``, ``binary`` and ``shape``)."""
    from smolvm_kernel.vm.boot import shape_key

    if ck.shape_key == shape_key(image, binary, shape):
        return
    here = (f"the {image.profile} image, {shape['vcpus']} vCPU, {shape['mem_mib']} MiB, {shape['disk_mib']} MiB disk"
            + (", a network" if shape.get("nic") else ""))
    raise CheckpointError(
        f"the checkpoint {ck.name!r} was taken in a VM of {ck.shape()}; this kernel's VM is of {here}"
        + (" (the same figures: the image or QEMU was rebuilt since)" if ck.shape() == here else "")
        + ": a checkpoint is restored only into a VM like the one it came from (%smolvm config sets the shape)")
