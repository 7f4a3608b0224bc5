"""Ready snapshots: a VM booted until its ipykernel waits, saved once, forked many times.

A snapshot is keyed by everything the saved state depends on: the image,
backend, accelerator, machine shape (vCPUs, memory, disk), the QEMU binary
and the host TSC rate the guest was told. It is built from a template VM
that gets a throw-away key; every fork is re-keyed and its RNGs reseeded by
the agent before the host lets any user code run (see guest/agent.py).

Layout: ``<cache>/snapshots/<profile>-<key16>/{state.bin, scratch.img, manifest.json}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from smolvm_kernel import paths
from smolvm_kernel.backends.base import VMSpec, copy_sparse
from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.images import Image

log = logging.getLogger("smolvm_kernel.vm.snapshot")
#: Bump when what a snapshot holds changes in a way the key does not capture.
SNAPSHOT_FORMAT = 4     # 4: guest RAM in its own file, mapped copy-on-write by forks


@dataclasses.dataclass(frozen=True)
class Snapshot:
    key: str
    directory: Path
    #: A sealed memfd with the guest RAM, given by hostd (classroom/sharedram.py)
    #: instead of a ram.bin of this user's own; the restore passes it to QEMU.
    ram_fd: int | None = None

    @property
    def state(self) -> Path:
        return self.directory / "state.bin"

    @property
    def scratch(self) -> Path:
        return self.directory / "scratch.img"

    @property
    def ram(self) -> Path:
        if self.ram_fd is not None:
            return Path(f"/proc/self/fd/{self.ram_fd}")    # QEMU's own, passed at the same number
        return self.directory / "ram.bin"

    def manifest(self) -> dict:
        try:
            return json.loads((self.directory / "manifest.json").read_text())
        except (OSError, ValueError):
            return {}


def qemu_identity(binary: str) -> str:
    st = os.stat(binary)
    return f"{os.path.realpath(binary)}|{st.st_size}|{st.st_mtime_ns}"


def snapshot_key(image: Image, backend: str, accel: str, vcpus: int, mem_mib: int,
                 disk_mib: int, vmm: str, tsc_khz: int | None, nic: bool = False) -> str:
    """The cache key: it changes with every input the saved state depends on."""
    blob = json.dumps({"format": SNAPSHOT_FORMAT, "image": image.key, "backend": backend,
                       "accel": accel, "vcpus": vcpus, "mem": mem_mib, "disk": disk_mib,
                       "vmm": vmm, "tsc": tsc_khz, **({"nic": True} if nic else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class SnapshotCache:
    """Find, build and drop ready snapshots."""

    def __init__(self, root: Path | None = None, seeds: Path | None = None) -> None:
        self.root = root or paths.snapshot_dir()
        #: A read-only folder of snapshots to copy from instead of building
        #: (a classroom's shared cache: a fork's QEMU must be able to open the
        #: RAM file for writing, so each user forks from a copy of their own,
        #: unless hostd gives a sealed memfd of it: see get).
        self.seeds = seeds if root else paths.snapshot_seed_dir()

    def path(self, image: Image, key: str) -> Path:
        return self.root / f"{image.profile}-{key[:16]}"

    def get(self, image: Image, key: str, shared_ram=None) -> Snapshot | None:
        """The snapshot ``key``: in this cache, else copied from the seed folder.
        ``shared_ram(key)`` (a classroom's hostd: HostClient.shared_ram) may give
        a sealed memfd of the seed's RAM: then only state, scratch disk and
        manifest are copied, and the fork maps that memfd (no ram.bin of its own)."""
        d = self.path(image, key)
        snap = Snapshot(key, d)
        if self.seeds is not None and shared_ram is not None:
            fd = shared_ram(key)
            if fd is not None:
                have = snap.manifest().get("key") == key and snap.state.exists() and snap.scratch.exists()
                snap = snap if have else self._copy_seed(image, key, with_ram=False)
                if snap is None:
                    os.close(fd)
                    return None
                (snap.directory / "ram.bin").unlink(missing_ok=True)     # a copy from before: not needed
                return Snapshot(key, snap.directory, ram_fd=fd)
        if snap.manifest().get("key") == key and all(p.exists() for p in (snap.state, snap.scratch, snap.ram)):
            return snap
        if self.seeds is not None:
            return self._copy_seed(image, key)
        return None

    def _copy_seed(self, image: Image, key: str, with_ram: bool = True) -> Snapshot | None:
        seed = SnapshotCache(self.seeds).get(image, key)
        if seed is None:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".seed-", dir=self.root))
        try:
            for part in ("state.bin", "scratch.img", "ram.bin", "manifest.json"):
                if part != "ram.bin" or with_ram:
                    copy_sparse(seed.directory / part, tmp / part)
            final = self.path(image, key)
            if final.exists() and (not with_ram or (final / "ram.bin").exists()):
                shutil.rmtree(tmp)
            else:
                if final.exists():      # copied without its RAM (hostd gave it then)
                    shutil.rmtree(final)
                os.rename(tmp, final)
            log.info("copied the ready snapshot %s from %s", final.name, self.seeds)
        except (OSError, SmolVMError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("cannot copy the ready snapshot from %s: %s", self.seeds, exc)
            return None
        snap = Snapshot(key, final)
        return snap if snap.manifest().get("key") == key else None

    def list(self) -> list[Snapshot]:
        """Every complete snapshot in the cache (current or not), by name."""
        if not self.root.is_dir():
            return []
        snaps = [Snapshot(Snapshot("", d).manifest().get("key", ""), d) for d in sorted(self.root.iterdir())
                 if not d.name.startswith(".") and d.is_dir()]
        return [s for s in snaps if s.key and s.state.exists()]

    def drop(self, snap: Snapshot, why: str) -> None:
        log.warning("dropping snapshot %s: %s", snap.directory.name, why)
        shutil.rmtree(snap.directory, ignore_errors=True)

    def prune_stale(self) -> list[Path]:
        """Remove snapshots of images that are no longer current or of an older
        format, and dead builds."""
        from smolvm_kernel.images import ImageCache

        current = {img.key for img in ImageCache().list()}
        keep = set()
        removed = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith(".build-") and time.time() - d.stat().st_mtime > 3600:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
                    continue
                manifest = Snapshot("", d).manifest()
                if manifest.get("image") in current and manifest.get("format") == SNAPSHOT_FORMAT:
                    keep.add(manifest.get("key"))
        return removed + self.prune(keep)

    def lock(self, image: Image, key: str, wait: bool = True):
        """Take the build lock of one snapshot; close the returned file to release it.

        One process builds a snapshot; the others wait (``wait``), then find it
        built, or get None at once while it is held (``wait=False``).
        """
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / f".{image.profile}-{key[:16]}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def prune(self, keep: set[str]) -> list[Path]:
        """Remove every snapshot whose key is not in ``keep``."""
        removed = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith("."):
                    continue
                if Snapshot("", d).manifest().get("key") not in keep:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
        return removed

    async def build(self, image: Image, key: str, spec_args: dict, binary: str,
                    boot_timeout: float) -> Snapshot:
        """Boot a template VM, wait for its kernel, save it; atomic in the cache.

        A template that does not come up in time is tried once more: a rare
        emulated boot can stall, and a second boot costs less than having no
        snapshot.
        """
        from smolvm_kernel.errors import BootTimeout

        try:
            return await self._build_once(image, key, spec_args, binary, boot_timeout)
        except BootTimeout as exc:
            log.warning("the snapshot template did not come up (%s); trying once more", exc)
            return await self._build_once(image, key, spec_args, binary, boot_timeout)

    async def _build_once(self, image: Image, key: str, spec_args: dict, binary: str,
                          boot_timeout: float) -> Snapshot:
        from smolvm_kernel.backends.qemu import QemuBackend
        from smolvm_kernel.channel.stream import GuestChannel

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=self.root))
        t0 = time.monotonic()
        spec = VMSpec(vm_id="template", run_dir=tmp, image=image, ram_file=tmp / "ram.bin", ram_shared=True,
                      **spec_args)
        backend = QemuBackend(spec, binary, drop_privileges=False)
        ready: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_frame(chan, body):
            from smolvm_guest import wire
            if chan == wire.Channel.AGENT and not ready.done():
                event = wire.decode_json(body)
                if event.get("event") == "kernel_ready":
                    ready.set_result(event)
                elif event.get("event") == "kernel_died":
                    ready.set_exception(SmolVMError(f"template kernel died: {event.get('log')}"))

        chan = None
        try:
            await backend.launch()
            reader, writer = await backend.open_channel(boot_timeout)
            chan = GuestChannel(reader, writer, on_frame, lambda e: None)
            # A throw-away key: every fork is re-keyed before it is used.
            await chan.handshake({"key": secrets.token_hex(32)}, boot_timeout)
            chan.start()
            try:
                await asyncio.wait_for(ready, boot_timeout)
            except asyncio.TimeoutError:
                from smolvm_kernel.errors import BootTimeout
                raise BootTimeout(boot_timeout, "the template's kernel", backend.console_tail()) from None
            await chan.request("quiesce", timeout=30)
            boot_s = time.monotonic() - t0
            size = await asyncio.to_thread(_save, tmp / "qmp.sock", tmp / "state.bin")
            await chan.close()
            chan = None
            await backend.kill()
            final_tmp = tmp / "snapshot"
            final_tmp.mkdir()
            os.rename(tmp / "state.bin", final_tmp / "state.bin")
            os.rename(spec.scratch_disk, final_tmp / "scratch.img")
            os.rename(tmp / "ram.bin", final_tmp / "ram.bin")
            ram = final_tmp / "ram.bin"
            manifest = {"key": key, "format": SNAPSHOT_FORMAT, "image": image.key,
                        "profile": image.profile, "boot_s": round(boot_s, 2),
                        "save_s": round(time.monotonic() - t0 - boot_s, 2), "state_bytes": size,
                        "ram_file_bytes": ram.stat().st_blocks * 512,
                        "shape": {k: v for k, v in spec_args.items() if k != "debug_console"},
                        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (final_tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            final = self.path(image, key)
            if final.exists():
                shutil.rmtree(final)
            os.rename(final_tmp, final)
            self.prune_stale()
            return Snapshot(key, final)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("building the snapshot failed: %s\n%s", exc, backend.console_tail(1500))
            raise
        finally:
            if chan is not None:
                await chan.close()
            await backend.kill()
            shutil.rmtree(tmp, ignore_errors=True)


def _save(qmp_path: Path, state: Path) -> int:
    from smolvm_kernel.backends.qmp import QMP

    with QMP(qmp_path) as qmp:
        return qmp.migrate_to_file(state, ignore_shared=True)
