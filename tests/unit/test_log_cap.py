"""A VM's logs are cut back to their tail, while the VMM goes on appending."""

from __future__ import annotations

import os
import threading

from smolvm_kernel.backends.base import cap_file


def test_a_log_over_its_cap_keeps_a_note_and_its_tail(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"a" * 5000 + b"b" * 1000)
    assert cap_file(path, cap=4000, keep=1000) == 5000
    assert path.read_bytes() == b"[smolvm: 5000 earlier bytes of this log were cut]\n" + b"b" * 1000
    assert cap_file(path, cap=4000, keep=1000) == 0          # under the cap: untouched


def test_a_writer_with_o_append_goes_on_after_the_kept_tail(tmp_path):
    """As QEMU's chardev (append=on) and the VMM's stdout do: no sparse hole at
    the old offset, and the file stays near the cap however much is written."""
    path = tmp_path / "vmm.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            os.write(fd, b"line of output\n" * 64)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(200):
            cap_file(path, cap=64 * 1024, keep=16 * 1024)
    finally:
        stop.set()
        t.join()
        os.close(fd)
    cap_file(path, cap=64 * 1024, keep=16 * 1024)
    data = path.read_bytes()
    assert len(data) <= 64 * 1024 and b"\0" not in data
    assert os.stat(path).st_blocks * 512 < 256 * 1024           # not a sparse giant


def test_a_missing_log_or_a_symlink_is_left_alone(tmp_path):
    assert cap_file(tmp_path / "none.log", cap=10, keep=5) == 0
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 100)
    link = tmp_path / "console.log"
    link.symlink_to(target)
    try:
        cap_file(link, cap=10, keep=5)
    except OSError:
        pass
    assert target.read_bytes() == b"x" * 100
