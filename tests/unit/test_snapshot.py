"""The ready-snapshot cache key and cache bookkeeping."""

from __future__ import annotations

import json

from smolvm_kernel.images import Image
from smolvm_kernel.vm.snapshot import SnapshotCache, snapshot_key

BASE = dict(backend="qemu", accel="tcg", vcpus=2, mem_mib=512, disk_mib=2048, vmm="qemu|1|2",
            tsc_khz=2600000)


def _image(key: str = "a" * 64) -> Image:
    return Image("base", key, None, "6.1")


def test_key_changes_with_every_input():
    k0 = snapshot_key(_image(), **BASE)
    assert snapshot_key(_image(), **BASE) == k0
    variants = [dict(backend="firecracker"), dict(accel="kvm"), dict(vcpus=1), dict(mem_mib=1024),
                dict(disk_mib=4096), dict(vmm="qemu|1|3"), dict(tsc_khz=2500000)]
    keys = {snapshot_key(_image(), **{**BASE, **v}) for v in variants}
    keys.add(snapshot_key(_image("b" * 64), **BASE))       # the image changed
    assert k0 not in keys and len(keys) == len(variants) + 1


def test_incomplete_or_foreign_snapshots_are_not_used(tmp_path):
    cache = SnapshotCache(tmp_path)
    image = _image()
    key = snapshot_key(image, **BASE)
    d = cache.path(image, key)
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"key": key}))
    assert cache.get(image, key) is None            # no state file yet
    (d / "state.bin").write_bytes(b"x")
    (d / "scratch.img").write_bytes(b"x")
    assert cache.get(image, key) is None            # no RAM file yet
    (d / "ram.bin").write_bytes(b"x")
    assert cache.get(image, key).directory == d
    (d / "manifest.json").write_text(json.dumps({"key": "other"}))
    assert cache.get(image, key) is None
    assert cache.prune(keep={key}) == [d] and not d.exists()


def test_list_shows_complete_snapshots_only(tmp_path):
    cache = SnapshotCache(tmp_path)
    for name, key, with_state in (("base-1", "k1", True), ("base-2", "k2", False), (".build-x", "k3", True)):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"key": key}))
        if with_state:
            (d / "state.bin").write_bytes(b"s")
    (tmp_path / ".base-1.lock").write_text("")
    assert [s.key for s in cache.list()] == ["k1"]
    assert SnapshotCache(tmp_path / "missing").list() == []


def test_a_user_of_a_read_only_shared_cache_forks_from_a_copy_of_its_own(tmp_path):
    shared, own = SnapshotCache(tmp_path / "shared"), SnapshotCache(tmp_path / "own", seeds=tmp_path / "shared")
    image = _image()
    key = snapshot_key(image, **BASE)
    assert own.get(image, key) is None               # nothing to copy yet
    d = shared.path(image, key)
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"key": key}))
    for part in ("state.bin", "scratch.img", "ram.bin"):
        (d / part).write_bytes(part.encode())
    snap = own.get(image, key)
    assert snap.directory.parent == tmp_path / "own" and snap.ram.read_bytes() == b"ram.bin"
    assert not [p for p in (tmp_path / "own").iterdir() if p.name.startswith(".seed-")]


def test_snapshots_go_to_the_users_own_cache_when_the_shared_one_is_read_only(tmp_path, monkeypatch):
    import os

    from smolvm_kernel import paths

    monkeypatch.delenv("SMOLVM_SNAPSHOT_DIR", raising=False)
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    (tmp_path / "shared" / "snapshots").mkdir(parents=True)
    assert paths.snapshot_dir() == tmp_path / "shared" / "snapshots" and paths.snapshot_seed_dir() is None
    monkeypatch.setattr(os, "access", lambda p, mode: False)     # as a student sees root's cache
    assert paths.snapshot_dir() == tmp_path / "home-cache" / "smolvm-kernel" / "snapshots"
    assert paths.snapshot_seed_dir() == tmp_path / "shared" / "snapshots"
