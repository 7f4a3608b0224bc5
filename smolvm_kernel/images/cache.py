"""The content-hashed image cache: find, list, build and remove guest images."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from smolvm_kernel import paths
from smolvm_kernel.errors import ConfigError, ImageNotFound
from smolvm_kernel.images import course as course_mod
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

    def courses(self) -> dict[str, course_mod.Course]:
        """The course images' recipes registered in this cache, by name."""
        return course_mod.registered(self.root)

    def profiles(self) -> dict[str, str]:
        """Every profile an image can be built or found for: name -> what it holds."""
        out = {name: p.description for name, p in recipe.PROFILES.items()}
        for name, c in self.courses().items():
            out[name] = f"course image on {c.base}" + (f" from {c.folder}" if c.folder else "")
        return out

    def list(self) -> list[Image]:
        """Every complete image whose recipe still matches this version's, newest first."""
        found = []
        if not self.images_dir.is_dir():
            return found
        courses = self.courses()
        for d in sorted(self.images_dir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            manifest = recipe.read_manifest(d)
            if not manifest:
                continue
            name, kernel_package = manifest.get("profile"), manifest.get("kernel_package", "")
            if name in recipe.PROFILES:
                key = recipe.image_key(recipe.PROFILES[name], kernel_package)
            elif name in courses:
                key = course_mod.course_key(courses[name], kernel_package)
            else:
                continue
            if key != manifest.get("key"):
                continue  # built from an older recipe: stale
            found.append(Image(name, manifest["key"], d, manifest.get("kernel_release", "")))
        return found

    def get(self, profile: str) -> Image:
        """Return the newest current image for ``profile`` or raise :class:`ImageNotFound`."""
        self.check_profile(profile)
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
        from smolvm_kernel.images.build import CourseBuilder, ImageBuilder

        self.check_profile(profile)
        if profile in recipe.PROFILES:
            return ImageBuilder(self, recipe.PROFILES[profile], progress=progress).build(force=force)
        # A course image: rebuilt from the recipe recorded when it was first built.
        return CourseBuilder(self, self.courses()[profile], progress=progress).build(force=force)

    def build_course(self, course: course_mod.Course, progress: Callable[[str], None] | None = None,
                     force: bool = False) -> Image:
        """Build (or reuse) a course image; it is then a profile of this cache (see ``courses``)."""
        from smolvm_kernel.images.build import CourseBuilder

        return CourseBuilder(self, course, progress=progress).build(force=force)

    def check_profile(self, profile: str) -> None:
        """Raise :class:`ConfigError` listing what exists, unless ``profile`` is known here."""
        if profile in recipe.PROFILES or profile in self.courses():
            return
        raise ConfigError("profile", profile, unknown_profile_fix(self.profiles()))

    def remove(self, target: str) -> list[Path]:
        """Remove images whose profile or hash prefix is ``target`` (``all``: everything)."""
        removed = []
        if target == "all":
            for d in (self.images_dir, self.parts_dir, course_mod.courses_dir(self.root)):
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
        registered = course_mod.courses_dir(self.root) / f"{target}.json"
        if registered.exists():
            # Unregistered too: the name is no longer a profile (and its parts are pruned next).
            registered.unlink()
            removed.append(registered)
            removed += self.prune_stale()
        return removed

    def prune_stale(self, pip_cache: bool = False, grace_s: float = 0) -> list[Path]:
        """Remove images and parts that no current recipe refers to (and the course layers'
        wheels with ``pip_cache``: a course rebuild then downloads them again). Parts
        changed in the last ``grace_s`` seconds are kept (a build under way may need them)."""
        import time

        from smolvm_kernel.images.build import PIP_CACHE, rootfs_part_name

        current = self.list()
        keep = {img.directory for img in current}
        keep_parts = {rootfs_part_name(p) for p in recipe.PROFILES.values()}
        keep_parts |= {rootfs_part_name(c.rootfs_profile) for c in self.courses().values()}
        keep_parts.add("busybox")
        if not pip_cache:
            keep_parts.add(PIP_CACHE)
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
                if grace_s and folder == self.parts_dir and time.time() - entry.stat().st_mtime < grace_s:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed


def unknown_profile_fix(profiles: dict[str, str]) -> str:
    """The fix for an unknown profile: what exists here, and how to build a course image."""
    return (f"choose one of {', '.join(profiles)}, or build a course image first with "
            f"`smolvm-kernel image build --profile NAME --from FOLDER` (a folder with requirements.txt)")

