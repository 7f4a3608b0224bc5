"""What goes into a guest image, and the content hash that names it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path

#: Bump when the build steps change in a way the inputs below do not capture.
BUILDER_VERSION = 1
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: Loaded in this order by the initramfs (dependencies first). virtio_balloon
#: lets the host change memory live; the vsock trio serves Firecracker.
MODULES = (
    "virtio", "virtio_ring", "virtio_mmio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "virtio_blk", "virtio_console", "virtio-rng", "virtio_balloon",
    "failover", "net_failover", "virtio_net",
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
    "squashfs", "overlay",
)
DPKG_EXCLUDES = (
    "/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*",
    "/usr/share/lintian/*", "/usr/share/linda/*",
)


@dataclasses.dataclass(frozen=True)
class Profile:
    """A named set of packages for the guest root file system."""

    name: str
    apt: tuple[str, ...]
    description: str


#: iproute2 configures the NIC when the VM has one; dropbear-bin is the SSH
#: server of the SSH transport (started only then).
_BASE_APT = ("python3", "libpython3.11-stdlib", "procps", "iproute2", "dropbear-bin")
PROFILES: dict[str, Profile] = {
    "base": Profile("base", _BASE_APT, "python3 + ipykernel, pyzmq, ipywidgets"),
    "scipy": Profile("scipy", _BASE_APT + ("python3-numpy", "python3-pandas", "python3-matplotlib"),
                     "base + numpy, pandas, matplotlib"),
}


def guest_requirements() -> str:
    return resources.files("smolvm_kernel.images").joinpath("guest-requirements.txt").read_text()


def guest_sources() -> dict[str, bytes]:
    """The guest package's files (agent, init, wire), by relative name."""
    root = resources.files("smolvm_guest")
    out = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_file() and (entry.name.endswith(".py") or entry.name == "initramfs-init"):
            out[entry.name] = entry.read_bytes()
    return out


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def rootfs_key(profile: Profile) -> str:
    """Hash of everything the root file system is built from."""
    return _digest({
        "builder": BUILDER_VERSION, "suite": SUITE, "mirrors": MIRRORS, "apt": profile.apt,
        "excludes": DPKG_EXCLUDES, "pip": guest_requirements(),
    })


def image_key(profile: Profile, kernel_package: str) -> str:
    """Hash of the whole image: root file system, kernel and initramfs inputs."""
    sources = {name: hashlib.sha256(data).hexdigest() for name, data in guest_sources().items()}
    return _digest({
        "rootfs": rootfs_key(profile), "kernel": kernel_package, "busybox": BUSYBOX_PACKAGE,
        "modules": MODULES, "guest": sources,
    })


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
