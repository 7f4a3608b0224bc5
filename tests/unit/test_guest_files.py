"""Guest file I/O for push/pull: beneath the allowed roots, no links followed,
regular files only, whole files, and never stuck (run here as this user)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import time

import pytest

from smolvm_guest import files


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "outside").mkdir()
    return home


def _put(home, path, data, offset=0, total=None):
    root, parts = files.split_beneath(path, str(home), (str(home),))
    return files.as_user(os.getuid(), os.getgid(), files.put, root, parts, data, offset, total)


def _get(home, path, offset=0, length=1 << 20):
    root, parts = files.split_beneath(path, str(home), (str(home),))
    return files.as_user(os.getuid(), os.getgid(), files.get, root, parts, offset, length, 1 << 30)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "", "a\x00b", "."])
def test_paths_outside_the_roots_are_refused(home, path):
    with pytest.raises((files.Refused, ValueError)):
        files.split_beneath(path, str(home), (str(home),))


def test_tilde_is_the_home(home):
    assert files.split_beneath("~/d/f.txt", str(home), (str(home),)) == (str(home), ["d", "f.txt"])


def test_put_appears_whole_only_once_complete(home):
    assert _put(home, "d/f.bin", b"ab", 0, total=4) == 2
    assert not (home / "d" / "f.bin").exists()           # half a file is never visible
    assert _put(home, "d/f.bin", b"cd", 2, total=4) == 4
    assert (home / "d" / "f.bin").read_bytes() == b"abcd"
    assert _get(home, "d/f.bin") == (4, b"abcd")


def test_links_are_never_followed(home, tmp_path):
    outside = tmp_path / "outside"
    (outside / "secret").write_text("s")
    (home / "dirlink").symlink_to(outside)
    (home / "filelink").symlink_to(outside / "secret")
    with pytest.raises(files.Refused, match="symbolic links are not followed"):
        _put(home, "dirlink/new", b"x")
    with pytest.raises(files.Refused):
        _get(home, "dirlink/secret")
    with pytest.raises(files.Refused):
        _get(home, "filelink")
    # A put onto a link's name replaces the link itself, never its target.
    _put(home, "filelink", b"mine")
    assert (outside / "secret").read_text() == "s" and (home / "filelink").read_bytes() == b"mine"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_fifo_is_refused_at_once(home):
    os.mkfifo(home / "pipe")
    t = time.monotonic()
    with pytest.raises(files.Refused, match="not a regular file"):
        _get(home, "pipe")
    assert time.monotonic() - t < files.DEADLINE_S      # refused, not waited on


def _exchange_forever(a: str, b: str) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE), as fast as possible."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    while True:
        libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange)


def test_swapping_a_directory_for_a_link_during_pushes_never_writes_outside(home, tmp_path):
    """The race a check-then-open loses: the user's code swaps ``sub`` between a
    real directory and a link to a folder outside while pushes go on. The swap is
    one atomic exchange, in another process (no GIL between it and the pushes)."""
    outside = tmp_path / "outside"
    (home / "sub").mkdir()
    (home / "alt").symlink_to(outside)
    swapper = multiprocessing.get_context("fork").Process(
        target=_exchange_forever, args=(str(home / "sub"), str(home / "alt")), daemon=True)
    swapper.start()
    refused = pushes = 0
    deadline = time.monotonic() + 30
    try:
        while pushes < 300 or (refused < 20 and time.monotonic() < deadline):
            try:
                _put(home, f"sub/f{pushes}", b"x")
            except files.Refused:
                refused += 1
            pushes += 1
    finally:
        swapper.kill()
        swapper.join(5)
    assert list(outside.iterdir()) == [], "a push went through the link"
    inside = [p for d in ("sub", "alt") if (home / d).is_dir() and not (home / d).is_symlink()
              for p in (home / d).iterdir()]
    print(f"{pushes} pushes during the swap loop: {refused} refused, {len(inside)} written inside")
    assert refused > 0, "the swap loop never caught a push: this test would not see the race"
    assert inside, "no push got through: the test would not see a push written outside either"
