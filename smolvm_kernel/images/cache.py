"""The content-hashed image cache: find, list, build and remove guest images."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from smolvm_kernel import paths
from smolvm_kernel.errors import ConfigError, ImageNotFound
from smolvm_kernel.images import recipe
from smolvm_kernel.images.image import Image


class ImageCache:
    """Images under ``<cache>/images/<profile>-<hash>``; parts under ``<cache>/parts``.

    Example::

        cache = ImageCache()
        image = cache.ensure("base")     # builds on first use
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.cache_dir()

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    def list(self) -> list[Image]:
        """Every complete image whose recipe still matches this version's, newest first."""
        found = []
        if not self.images_dir.is_dir():
            return found
        for d in sorted(self.images_dir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            manifest = recipe.read_manifest(d)
            if not manifest or manifest.get("profile") not in recipe.PROFILES:
                continue
            profile = recipe.PROFILES[manifest["profile"]]
            if recipe.image_key(profile, manifest.get("kernel_package", "")) != manifest.get("key"):
                continue  # built from an older recipe: stale
            found.append(Image(profile.name, manifest["key"], d, manifest.get("kernel_release", "")))
        return found

    def get(self, profile: str) -> Image:
        """Return the newest current image for ``profile`` or raise :class:`ImageNotFound`."""
        _check_profile(profile)
        for image in self.list():
            if image.profile == profile:
                return image
        raise ImageNotFound(profile)

    def ensure(self, profile: str, progress: Callable[[str], None] | None = None) -> Image:
        """Return the image for ``profile``, building it first if needed."""
        try:
            return self.get(profile)
        except ImageNotFound:
            return self.build(profile, progress=progress)

    def build(self, profile: str, progress: Callable[[str], None] | None = None,
              force: bool = False) -> Image:
        """Build (or, unless ``force``, reuse) the image for ``profile``."""
        from smolvm_kernel.images.build import ImageBuilder

        _check_profile(profile)
        return ImageBuilder(self, recipe.PROFILES[profile], progress=progress).build(force=force)

    def remove(self, target: str) -> list[Path]:
        """Remove images whose profile or hash prefix is ``target`` (``all``: everything)."""
        removed = []
        if target == "all":
            for d in (self.images_dir, self.parts_dir):
                if d.exists():
                    shutil.rmtree(d)
                    removed.append(d)
            return removed
        if not self.images_dir.is_dir():
            return removed
        for d in self.images_dir.iterdir():
            manifest = recipe.read_manifest(d) or {}
            if target in (manifest.get("profile"), d.name) or manifest.get("key", "").startswith(target):
                shutil.rmtree(d)
                removed.append(d)
        return removed

    def prune_stale(self) -> list[Path]:
        """Remove images and parts that no current recipe refers to."""
        current = self.list()
        keep = {img.directory for img in current}
        keep_parts = {f"rootfs-{p.name}-{recipe.rootfs_key(p)[:16]}.sqfs" for p in recipe.PROFILES.values()}
        keep_parts.add("busybox")
        for img in current:
            pkg = (recipe.read_manifest(img.directory) or {}).get("kernel_package", "")
            keep_parts.add("kernel-" + pkg.replace("=", "-"))
        removed = []
        for folder, kept in ((self.images_dir, {d.name for d in keep}), (self.parts_dir, keep_parts)):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name in kept or entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed


def _check_profile(profile: str) -> None:
    if profile not in recipe.PROFILES:
        raise ConfigError("profile", profile, f"choose one of {', '.join(recipe.PROFILES)}")

