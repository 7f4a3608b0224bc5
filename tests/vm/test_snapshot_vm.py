"""Starting and resetting from a ready snapshot: fast, and no shared secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from smolvm_kernel.vm.sandbox import Sandbox
from smolvm_kernel.vm.snapshot import SnapshotCache

FINGERPRINT = ("import os, random, uuid\n"
               "print(os.urandom(16).hex(), random.random(), uuid.uuid4(),"
               " get_ipython().kernel.session.key.decode(), get_ipython().kernel.session.session)")


def _out(sb, code):
    return "".join(o.text for o in sb.execute(code)).strip()


def _snapshot_dirs():
    root = SnapshotCache().root
    return {d for d in root.iterdir() if not d.name.startswith(".")} if root.is_dir() else set()


@pytest.fixture(scope="module")
def forks(image, sandbox_factory):
    # The first start builds this shape's snapshot if there is none (or drops
    # a damaged one and cold-boots); the two forks are then both restores.
    sandbox_factory().stop()
    a = sandbox_factory()
    b = sandbox_factory()
    return a, b


def test_both_forks_come_from_the_snapshot(forks):
    assert [sb.started_from for sb in forks] == ["snapshot", "snapshot"]


def test_forks_share_no_randomness_or_keys(forks):
    a, b = forks
    fa, fb = _out(a, FINGERPRINT).split(), _out(b, FINGERPRINT).split()
    assert len(fa) == len(fb) == 5
    for x, y in zip(fa, fb):
        assert x != y       # urandom, random.random(), uuid4, session key, session id (msg_id prefix)
    assert fa[3] == a.guest_key.decode() and fb[3] == b.guest_key.decode()


def test_restore_leaves_no_trace_in_the_user_namespace(image, sandbox_factory):
    # After a restore the agent re-keys the kernel from a thread and then
    # warms the path of a cell with a request of its own: none of it may show.
    sb = sandbox_factory()
    assert sb.started_from == "snapshot"
    assert _out(sb, "print(repr(_), len(In), get_ipython().execution_count, '_smolvm_warmup' in dir())") \
        == "'' 2 1 False"
    # The template ran a failing cell to warm the traceback path: %debug must
    # not find its error, and its output never reached anyone.
    assert _out(sb, "import sys; print(hasattr(sys, 'last_value'), hasattr(sys, 'last_traceback'))") \
        == "False False"
    # ... and it did warm it: executing's parse of IPython's own file and the
    # lexer's compiled rules are in the restored process.
    assert _out(sb, "import stack_data, IPython.core.interactiveshell as m, pygments.lexers.python as p; "
                    "cache = vars(stack_data.core.Source).get('__source_cache_with_lines', {}); "
                    "print(any(key[0] == m.__file__ for key in cache), '_tokens' in p.PythonLexer.__dict__)") \
        == "True True"


def test_forks_are_independent(forks):
    a, b = forks
    _out(a, "open('/home/user/only-a', 'w').write('a'); shared = 'a'")
    assert _out(b, "import os; print(os.path.exists('/home/user/only-a'), 'shared' in globals())") \
        == "False False"
    assert _out(a, "print(shared)") == "a"


def test_a_forks_balloon_never_punches_the_shared_ram_file(forks):
    """QEMU 7.2 frees ballooned RAM of a file-backed block by punching a hole in
    the file, private mapping or not. Control (balloon_refusal returning None):
    one fork's set_memory(200) took the shared ram.bin from 512 to 198 MiB
    allocated, and the other fork panicked (init killed by SIGSEGV)."""
    import hashlib

    from smolvm_kernel.errors import ConfigError, SmolVMError

    a, b = forks
    ram = a.backend.spec.ram_file
    assert ram is not None and b.backend.spec.ram_file == ram

    def fingerprint():
        with open(ram, "rb") as fh:
            return os.fstat(fh.fileno()).st_blocks, hashlib.sha256(fh.read()).hexdigest()

    before = fingerprint()
    assert not a.can_resize_live(200)
    with pytest.raises(ConfigError, match="punch holes"):
        a.set_memory(200)
    with pytest.raises(SmolVMError, match="balloon was not used"):
        a.backend.set_memory(200)
    assert fingerprint() == before
    assert _out(b, "print(sum(range(10**6)))") == "499999500000"
    assert _out(a, "print(6 * 7)") == "42"


def test_clock_is_current_after_restore(forks):
    import time

    guest = float(_out(forks[0], "import time; print(time.time())"))
    assert abs(guest - time.time()) < 10


def test_reset_restores_a_clean_vm(forks):
    a, _ = forks
    _out(a, "open('/home/user/before-reset', 'w').write('x'); z = 1")
    a.reset()
    assert a.started_from == "snapshot"
    assert _out(a, "import os; print(os.path.exists('/home/user/before-reset'), 'z' in globals())") \
        == "False False"


def test_new_shape_cold_boots_at_once_and_builds_its_snapshot_in_the_background(image, sandbox_factory):
    import shutil

    for d in _snapshot_dirs():      # a previous run may have left this shape's
        if json.loads((d / "manifest.json").read_text())["shape"]["disk_mib"] == 1024:
            shutil.rmtree(d)
    before = _snapshot_dirs()
    lines = []
    sb = Sandbox(backend="qemu", vcpus=2, mem_mib=512, disk_mib=1024, progress=lines.append)
    sandbox_factory.sandboxes.append(sb)
    sb.start()
    # No wait for a template: the first start of a shape boots at once ...
    assert sb.started_from == "cold boot"
    assert any("built in the background" in line for line in lines), lines
    assert _out(sb, "print(1 + 1)") == "2"          # ... and works while the snapshot builds
    assert sb.wait_for_snapshot(300)
    assert len(_snapshot_dirs() - before) == 1       # a new key: built, not reused
    sb.reset()
    assert sb.started_from == "snapshot"             # the next start restores it
    assert _out(sb, "print(2 + 2)") == "4"


def test_snapshot_wait_builds_first_then_restores(image, sandbox_factory):
    import shutil

    for d in _snapshot_dirs():
        if json.loads((d / "manifest.json").read_text())["shape"]["disk_mib"] == 1536:
            shutil.rmtree(d)
    sb = sandbox_factory(disk_mib=1536, snapshot="wait")
    assert sb.started_from == "snapshot" and sb.snapshot_build is None
    assert _out(sb, "print(1 + 1)") == "2"


def _snapshot_with_disk(disk_mib: int) -> Path:
    for d in _snapshot_dirs():
        manifest = json.loads((d / "manifest.json").read_text())
        shape = manifest["shape"]
        if manifest["profile"] == "base" and (shape["vcpus"], shape["mem_mib"], shape["disk_mib"]) == (2, 512, disk_mib):
            return d
    raise AssertionError(f"no snapshot with a {disk_mib} MiB disk")


def test_corrupt_snapshot_falls_back_to_a_cold_boot(image, sandbox_factory):
    # Damage the test-only shape's snapshot (built by the test above), not the
    # default one that users' kernels restore from.
    snap_dir = _snapshot_with_disk(1024)
    state = snap_dir / "state.bin"
    with open(state, "r+b") as fh:
        fh.truncate(state.stat().st_size // 3)
    lines = []
    sb = Sandbox(backend="qemu", vcpus=2, mem_mib=512, disk_mib=1024, progress=lines.append)
    sandbox_factory.sandboxes.append(sb)
    sb.start()
    assert sb.started_from == "cold boot"
    assert any("snapshot restore failed" in line for line in lines)
    assert not snap_dir.exists()                 # dropped: the next start rebuilds it
    assert _out(sb, "print('ok')") == "ok"
