"""Image recipe hashing, the initramfs writer, module dependencies, the cache."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from smolvm_kernel.errors import ConfigError, ImageNotFound
from smolvm_kernel.images import ImageCache, recipe
from smolvm_kernel.images.build import _Cpio, extract_vmlinux, module_depends


def test_keys_change_with_every_input(monkeypatch):
    base = recipe.PROFILES["base"]
    k0 = recipe.image_key(base, "linux-image-x=1")
    assert recipe.image_key(base, "linux-image-x=2") != k0
    assert recipe.image_key(recipe.PROFILES["scipy"], "linux-image-x=1") != k0
    more = dataclasses.replace(base, apt=base.apt + ("htop",))
    assert recipe.rootfs_key(more) != recipe.rootfs_key(base)
    real = recipe.guest_sources()
    monkeypatch.setattr(recipe, "guest_sources", lambda: {**real, "agent.py": b"changed"})
    assert recipe.image_key(base, "linux-image-x=1") != k0
    # The root file system does not depend on the agent: only the initramfs does.
    assert recipe.rootfs_key(base) == recipe.rootfs_key(recipe.PROFILES["base"])


def test_guest_sources_include_agent_and_init():
    names = set(recipe.guest_sources())
    assert {"agent.py", "init.py", "wire.py", "initramfs-init"} <= names


def test_cpio_is_readable_by_cpio(tmp_path):
    out = tmp_path / "x.cpio"
    with open(out, "wb") as fh:
        c = _Cpio(fh)
        c.dir("bin")
        c.file("bin/hello", b"hi\n", 0o755)
        c.symlink("bin/alias", "hello")
        c.chardev("console", 5, 1)
        c.close()
    listing = subprocess.run(["cpio", "-itv"], stdin=open(out, "rb"), capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "bin/hello" in listing.stdout and "bin/alias -> hello" in listing.stdout
    assert "console" in listing.stdout


def test_module_depends():
    ko = b"\x7fELF...\x00license=GPL\x00depends=virtio,virtio_ring\x00name=virtio_blk\x00"
    assert module_depends(ko) == ["virtio", "virtio_ring"]
    assert module_depends(b"\x00depends=\x00") == []
    assert module_depends(b"no modinfo") == []


def test_extract_vmlinux_finds_the_lz4_elf(tmp_path):
    elf = b"\x7fELF" + bytes(range(256)) * 50
    packed = subprocess.run(["lz4", "-l", "-c"], input=elf, capture_output=True, check=True).stdout
    bzimage = b"MZ" + b"\x00" * 1000 + packed + b"trailing garbage"
    assert extract_vmlinux(bzimage) == elf


def test_missing_image_says_how_to_build(tmp_path):
    with pytest.raises(ImageNotFound, match="smolvm-kernel image build --profile base"):
        ImageCache(tmp_path).get("base")
    with pytest.raises(ConfigError, match="choose one of"):
        ImageCache(tmp_path).get("nope")


def test_stale_image_is_not_used(tmp_path):
    """An image whose recipe differs from this version's is ignored, then pruned."""
    d = tmp_path / "images" / "base-0123"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text('{"profile": "base", "key": "old", "kernel_package": "k=1"}')
    cache = ImageCache(tmp_path)
    assert cache.list() == []
    assert cache.prune_stale() == [d] and not d.exists()
