"""Guest file I/O for push/pull: beneath the allowed roots, no links followed,
regular files only, whole files, and never stuck (run here as this user)."""

from __future__ import annotations

import os
import threading
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


def test_swapping_a_directory_for_a_link_during_pushes_never_writes_outside(home, tmp_path):
    """The race a check-then-open loses: the user's code swaps ``sub`` between a
    real directory and a link to a folder outside while pushes go on."""
    outside = tmp_path / "outside"
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            try:
                os.rename(home / "sub", home / "sub-real")
                (home / "sub").symlink_to(outside)       # now sub leads outside ...
                time.sleep(0.0005)
                os.unlink(home / "sub")
                os.rename(home / "sub-real", home / "sub")   # ... and now it is the real one again
            except OSError:
                pass

    (home / "sub").mkdir()
    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    refused = 0
    try:
        for i in range(300):
            try:
                _put(home, f"sub/f{i}", b"x")
            except files.Refused:
                refused += 1
    finally:
        stop.set()
        swapper.join(5)
    assert list(outside.iterdir()) == [], "a push went through the link"
    written = len(list((home / "sub").iterdir())) if (home / "sub").is_dir() else 0
    print(f"300 pushes during the swap loop: {refused} refused, {written} written inside")
    assert refused > 0, "the swap loop never caught a push: this test would not see the race"
