"""The audit log: one JSON line per event, written whole by many processes,
rotated by size, and never an error for the VM it describes."""

from __future__ import annotations

import json
import multiprocessing
import os

from smolvm_kernel.host.audit import AuditLog


def test_an_event_is_one_json_line_with_who_and_when(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record("push", vm_id="abc", path="data.csv", bytes=12, skipped=None)
    (entry,) = log.read()
    assert entry["event"] == "push" and entry["vm_id"] == "abc" and entry["bytes"] == 12
    assert entry["uid"] == os.geteuid() and entry["pid"] == os.getpid() and entry["ts"].endswith("Z")
    assert "skipped" not in entry
    assert oct((tmp_path / "audit.jsonl").stat().st_mode & 0o777) == "0o600"


def _writer(path: str, n: int) -> None:
    log = AuditLog(path, max_bytes=100_000)
    for i in range(n):
        log.record("pull", path="p" * 300, i=i)


def test_many_writers_and_rotation_lose_or_tear_no_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    procs = [multiprocessing.Process(target=_writer, args=(str(path), 400)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    files = sorted(tmp_path.glob("audit.jsonl*"))
    lines = [line for f in files if not f.name.endswith(".lock") for line in f.read_text().splitlines()]
    assert all(json.loads(line)["event"] == "pull" for line in lines)      # none torn
    assert all(f.stat().st_size <= 100_000 for f in files)
    kept = len(lines)
    # 4 x 400 lines of ~450 bytes: more than the six files hold, so the oldest went
    assert 0 < kept < 1600 and (tmp_path / "audit.jsonl.5").exists()
    assert not (tmp_path / "audit.jsonl.6").exists()


def test_a_log_that_cannot_be_written_never_raises(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    log = AuditLog(blocked / "audit.jsonl")      # its folder is a file
    log.record("start", vm_id="x")
    log.record("stop", vm_id="x")
    assert log.read() == []


def test_a_long_field_is_cut_not_the_line(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record("refused", why="w" * 100_000)
    (entry,) = log.read()
    assert len(entry["why"]) < 5000 and entry["why"].endswith("…")
