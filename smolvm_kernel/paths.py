"""Where smolvm-kernel keeps its files (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def cache_dir() -> Path:
    """Guest images and their parts (rebuildable, shared by every VM)."""
    override = os.environ.get("SMOLVM_CACHE_DIR")
    return Path(override) if override else _xdg("XDG_CACHE_HOME", ".cache") / "smolvm-kernel"


def snapshot_dir() -> Path:
    """Ready snapshots: beside the images, or in this user's own cache when the
    images are shared and read-only to them (a classroom's students: their
    forks need snapshot files of their own, see snapshot_seed_dir)."""
    override = os.environ.get("SMOLVM_SNAPSHOT_DIR")
    if override:
        return Path(override)
    shared = cache_dir() / "snapshots"
    if not cache_dir().exists() or os.access(cache_dir(), os.W_OK):
        return shared
    return _xdg("XDG_CACHE_HOME", ".cache") / "smolvm-kernel" / "snapshots"


def snapshot_seed_dir() -> Path | None:
    """Snapshots built by whoever owns a shared, read-only cache; a user copies one
    into snapshot_dir() instead of building it (see SnapshotCache.get)."""
    shared = cache_dir() / "snapshots"
    return shared if snapshot_dir() != shared and shared.is_dir() else None


def state_dir() -> Path:
    """The registry of live VMs and each VM's private run folder."""
    override = os.environ.get("SMOLVM_STATE_DIR")
    return Path(override) if override else _xdg("XDG_STATE_HOME", ".local/state") / "smolvm-kernel"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by this user only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
