"""hostd's one sealed copy of a ready snapshot's RAM per course image
(classroom/sharedram.py): sealed against every write, sparse, given only for a
snapshot in the seed folder and only to a caller holding a grant; a fork's
snapshot then has no ram.bin of its own."""

from __future__ import annotations

import fcntl
import json
import mmap
import os

import pytest

from smolvm_kernel.classroom.hostd import HostService
from smolvm_kernel.classroom.sharedram import SharedRAM
from smolvm_kernel.host import policy
from smolvm_kernel.host.admission import HostClient
from smolvm_kernel.host.audit import AuditLog
from smolvm_kernel.images import Image
from smolvm_kernel.vm.snapshot import SnapshotCache

from support import loop_thread

KEY = "ab" * 32
MIB = 1 << 20


def _seed(folder, key=KEY, profile="base"):
    """A shared seed folder with one snapshot: 64 MiB of RAM, 2 MiB of it data."""
    d = folder / f"{profile}-{key[:16]}"
    d.mkdir(parents=True)
    with open(d / "ram.bin", "wb") as fh:
        fh.truncate(64 * MIB)
        fh.seek(8 * MIB)
        fh.write(b"\x5a" * MIB)
        fh.write(bytes(4 * MIB))        # written zeros: not copied
        fh.seek(40 * MIB)
        fh.write(b"\xa5" * MIB)
    (d / "state.bin").write_bytes(b"state")
    (d / "scratch.img").write_bytes(b"disk")
    (d / "manifest.json").write_text(json.dumps({"key": key}))
    return d


def test_the_memfd_is_sealed_sparse_and_the_seeds_content(tmp_path):
    _seed(tmp_path / "seeds")
    shared = SharedRAM(tmp_path / "seeds", owner=os.getuid())
    fd = shared.get(KEY)
    try:
        st = os.fstat(fd)
        assert st.st_size == 64 * MIB and st.st_blocks * 512 == 2 * MIB      # the data alone
        assert os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:smolvm-ram-{KEY[:16]} (deleted)"
        assert os.pread(fd, 4, 8 * MIB) == b"\x5a" * 4 and os.pread(fd, 4, 40 * MIB) == b"\xa5" * 4
        assert os.pread(fd, 4, 10 * MIB) == bytes(4)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == (fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                                                       | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        # Reopened read-write (as QEMU opens mem-path) it still cannot be changed.
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(rw, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(rw, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(rw, 128 * MIB)
            with pytest.raises(PermissionError):
                mmap.mmap(rw, 64 * MIB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                fcntl.fcntl(rw, fcntl.F_ADD_SEALS, 0)
            # A private map (a fork's guest RAM) is writable: copy-on-write, the memfd unchanged.
            m = mmap.mmap(rw, 64 * MIB, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            m[8 * MIB:8 * MIB + 4] = b"mine"
            assert os.pread(fd, 4, 8 * MIB) == b"\x5a" * 4
            m.close()
        finally:
            os.close(rw)
        assert shared.get(KEY) == fd             # one per key
    finally:
        shared.close()
    assert not shared.fds


def test_only_a_snapshot_in_the_seed_folder_of_its_owner_is_shared(tmp_path):
    seeds = tmp_path / "seeds"
    d = _seed(seeds)
    shared = SharedRAM(seeds, owner=os.getuid())
    for key in ("cd" * 32, KEY[:63], "../" + KEY[3:], KEY.upper(), None, 7):
        assert shared.get(key) is None, key
    os.chmod(d / "ram.bin", 0o666)               # writable by others: not root's alone
    assert shared.get(KEY) is None
    os.chmod(d / "ram.bin", 0o644)
    os.unlink(d / "ram.bin")
    os.symlink("/etc/passwd", d / "ram.bin")     # never followed
    assert shared.get(KEY) is None
    assert SharedRAM(seeds, owner=os.getuid() + 1).find(KEY) is None
    assert SharedRAM(None).get(KEY) is None


@pytest.fixture
def service(tmp_path):
    _seed(tmp_path / "seeds")
    svc = HostService(str(tmp_path / "hostd.sock"), policy.Policy("/etc/smolvm/policy.toml"),
                      audit=AuditLog(tmp_path / "audit.jsonl"), host_available_mib=lambda: 100_000,
                      make_cgroups=False, seeds=tmp_path / "seeds")
    svc.shared_ram.owner = os.getuid()
    with loop_thread() as run:
        run(svc.start())
        yield svc
        run(svc.close())


def test_hostd_gives_the_memfd_to_a_granted_caller_only_and_for_a_seeded_key(service, tmp_path):
    client = HostClient(service.path)
    try:
        assert client.shared_ram(KEY) is None              # no grant: nothing
        client.admit(1, 512, "k")
        assert client.shared_ram("cd" * 32) is None        # not in the seed folder
        fd = client.shared_ram(KEY)
        assert fd is not None and not os.get_inheritable(fd)
        assert os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:smolvm-ram-{KEY[:16]}")
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        os.close(fd)
        assert client.list()[0]["kernel_id"] == "k"        # the line protocol goes on after it
    finally:
        client.close()


def test_a_fork_copies_no_ram_when_hostd_gives_it(service, tmp_path):
    image = Image("base", "i" * 64, tmp_path, "6.1")
    cache = SnapshotCache(tmp_path / "mine", seeds=tmp_path / "seeds")
    client = HostClient(service.path)
    try:
        client.admit(1, 512, "k")
        snap = cache.get(image, KEY, client.shared_ram)
        assert snap is not None and snap.ram_fd is not None and snap.ram == tmp_path.__class__(
            f"/proc/self/fd/{snap.ram_fd}")
        assert sorted(p.name for p in snap.directory.iterdir()) == ["manifest.json", "scratch.img", "state.bin"]
        os.close(snap.ram_fd)
        again = cache.get(image, KEY, client.shared_ram)     # the copy is reused
        assert again.directory == snap.directory and again.ram_fd is not None
        os.close(again.ram_fd)
    finally:
        client.close()
    # Without hostd (a single user's cache, or the service gone): a copy with its RAM.
    alone = cache.get(image, KEY)
    assert alone.ram_fd is None and alone.ram.stat().st_size == 64 * MIB
