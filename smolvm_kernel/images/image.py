"""One built guest image, as a folder: kernel, initramfs, read-only root file system."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Image:
    """A built guest image: kernel, initramfs and read-only root file system."""

    profile: str
    key: str
    directory: Path
    kernel_release: str

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        """Uncompressed ELF kernel (Firecracker; PVH boot under QEMU)."""
        return self.directory / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.cpio"

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.sqfs"

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
