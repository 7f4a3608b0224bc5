"""The checkpoint store, its checks and caps, the %smolvm lines and the undo steps (no VM)."""

from __future__ import annotations

import json
import os
import time
import types
from pathlib import Path

import pytest

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.jupyter import hostline
from smolvm_kernel.jupyter.undo import UndoSteps
from smolvm_kernel.vm.checkpoints import CheckpointError, CheckpointStore, Load, check_name, why_not_saved


def fake_checkpoint(store: CheckpointStore, name: str, size: int = 4096, **meta) -> None:
    tmp = store.begin()
    for part in ("state.bin", "scratch.img"):
        (tmp / part).write_bytes(b"x" * size)
    store.commit(tmp, name, {"created": time.time(), "after_cell": 3, "shape_key": "k", "profile": "base",
                             "vcpus": 2, "mem_mib": 512, "disk_mib": 2048, "save_s": 0.1, **meta})


def test_a_checkpoint_is_private_and_loaded_only_when_nobody_else_can_write_it(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    fake_checkpoint(store, "draft")
    ck = store.open("draft")
    assert (ck.name, ck.after_cell, ck.profile, ck.ram_named) == ("draft", 3, "base", True)
    assert oct(os.stat(store.root).st_mode & 0o777) == "0o700"
    assert {oct(os.stat(p).st_mode & 0o777) for p in ck.directory.iterdir()} == {"0o600"}
    assert ck.load() == Load(ck.state, ck.scratch, None) and not ck.load().ignore_shared
    (ck.directory / "ram.bin").write_bytes(b"r")
    os.chmod(ck.directory / "ram.bin", 0o600)
    assert store.open("draft").load().ram == ck.ram_file and store.open("draft").load().ignore_shared
    for path, mode in ((ck.state, 0o620), (ck.directory, 0o770), (ck.directory / "meta.json", 0o602)):
        before = os.stat(path).st_mode & 0o777
        os.chmod(path, mode)
        with pytest.raises(CheckpointError, match="only you can write"):
            store.open("draft")
        assert store.list() == []           # not even listed
        os.chmod(path, before)
    os.chown(ck.state, 65534, 65534)        # another user's file
    with pytest.raises(CheckpointError, match="is never loaded"):
        store.open("draft")
    os.chown(ck.state, os.geteuid(), os.getegid())
    os.symlink(ck.directory, store.root / "alias")
    with pytest.raises(CheckpointError, match="not a folder of yours"):
        store.open("alias")                 # a link is not followed
    os.chmod(store.root, 0o777)
    with pytest.raises(CheckpointError, match="no checkpoint in it is used"):
        store.list()


def test_names_are_file_names_never_paths():
    for bad in ("", "../x", "a/b", ".hidden", "-flag", "x" * 65, None, 3):
        with pytest.raises(CheckpointError, match="is not a checkpoint name"):
            check_name(bad)
    assert check_name("before-cleaning_2.v1") == "before-cleaning_2.v1"


def test_a_broken_or_missing_checkpoint_says_how_to_remove_it(tmp_path):
    store = CheckpointStore(tmp_path / "c")
    with pytest.raises(CheckpointError, match="none taken yet"):
        store.open("x")
    fake_checkpoint(store, "a")
    with pytest.raises(CheckpointError, match=r"no checkpoint 'b' \(yours: a\)"):
        store.open("b")
    (store.root / "a" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read .*checkpoint --rm a"):
        store.open("a")
    (store.root / "a" / "meta.json").write_text(json.dumps({"format": 1, "name": "other"}))
    with pytest.raises(CheckpointError, match="cannot be read"):
        store.open("a")
    os.unlink(store.root / "a" / "scratch.img")
    with pytest.raises(CheckpointError, match="incomplete .*scratch.img"):
        store.open("a")
    assert store.remove("a") >= 4096 and not (store.root / "a").exists()
    with pytest.raises(CheckpointError, match="no checkpoint 'a'"):
        store.remove("a")


def test_caps_refuse_with_their_words_and_leave_nothing(tmp_path):
    whose = "the instructor's policy (/etc/smolvm/policy.toml)"
    store = CheckpointStore(tmp_path / "c", max_count=2, max_mib=1, whose=whose)
    fake_checkpoint(store, "one", size=100_000)
    fake_checkpoint(store, "one", size=100_000)          # replaced, not a second one
    fake_checkpoint(store, "two", size=100_000)
    with pytest.raises(CheckpointError, match=r"you have 2 checkpoints, the most the instructor's policy .* allows "
                                              r"\(max_checkpoints = 2\)"):
        store.check_room("three")
    store.check_room("two")                              # a name that exists is replaced
    with pytest.raises(CheckpointError, match=r"over the 1 MiB the instructor's policy .*max_checkpoint_mib"):
        fake_checkpoint(store, "two", size=500_000)
    assert [c.name for c in store.list()] == ["one", "two"]
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == ["one", "two"]
    off = CheckpointStore(tmp_path / "c", max_count=0, whose=whose)
    with pytest.raises(CheckpointError, match=r"switched off by the instructor's policy .*max_checkpoints = 0"):
        off.check_room("x")


def test_cleanup_removes_what_a_dead_process_half_wrote_and_undo_steps_of_gone_kernels(tmp_path):
    import subprocess

    from smolvm_kernel.host.procs import process_start_time, this_process

    store = CheckpointStore(tmp_path / "c")
    fake_checkpoint(store, "kept")
    old, fresh = store.begin(), store.begin()
    os.utime(old, (time.time() - 600, time.time() - 600))
    dead = subprocess.Popen(["true"])
    dead_start = process_start_time(dead.pid)
    dead.wait()
    fake_checkpoint(store, "undo-gone-1", owner=[dead.pid, dead_start])
    fake_checkpoint(store, "undo-live-1", owner=list(this_process()))
    fake_checkpoint(store, "undo-nobody-1")
    assert sorted(p.name for p in store.cleanup()) == sorted([old.name, "undo-gone-1", "undo-nobody-1"])
    assert fresh.exists() and store.open("kept") and store.open("undo-live-1")


def test_only_a_qemu_vm_over_virtio_serial_without_a_network_is_checkpointed():
    vm = types.SimpleNamespace(backend=types.SimpleNamespace(name="qemu"), transport="serial")
    assert why_not_saved(vm, "none") is None
    assert "network" in why_not_saved(vm, "nat") and "drop" in why_not_saved(vm, "nat")
    vm.transport = "ssh"
    assert "over ssh" in why_not_saved(vm, "none")
    vm.backend.name = "firecracker"
    assert "only QEMU" in why_not_saved(vm, "none")
    assert "start one" in why_not_saved(None, "none")


@pytest.mark.parametrize("where", [hostline.KERNEL, hostline.MAGIC])
def test_the_checkpoint_lines_in_the_one_grammar(where):
    p = hostline.parse
    assert p("checkpoint", where).command == "checkpoint" and p("checkpoint", where).paths == ()
    assert p("checkpoint before-cleaning", where).source == "before-cleaning"
    for line in ("checkpoint --rm x", "checkpoint x --rm"):
        assert p(line, where).remove and p(line, where).source == "x"
    assert p("restore x", where).source == "x" and p("checkpoints", where).command == "checkpoints"
    assert p("undo", where).command == "undo"
    for bad, words in (("restore", "restore NAME"), ("checkpoint --rm", "checkpoint"), ("undo x", "takes no"),
                       ("checkpoint a b", "checkpoint"), ("restore a --rm", "--rm is for checkpoint only")):
        with pytest.raises(SmolVMError, match=words):
            p(bad, where)
    assert "%smolvm undo" in hostline.help_text(where) and "%smolvm restore NAME" in hostline.help_text(where)
    assert p("config --undo 3", where).settings == {"checkpoint_each_cell": 3}


def test_the_list_of_checkpoints_reads_as_a_table(tmp_path):
    store = CheckpointStore(tmp_path / "c")
    assert "no checkpoints yet" in hostline.format_checkpoints([], time.time())
    fake_checkpoint(store, "before-cleaning", size=2**20)
    text = hostline.format_checkpoints(store.list(), time.time() + 720)
    assert "before-cleaning" in text and "12 min ago" in text and "[3]" in text and "2 MiB" in text
    assert "1 checkpoint(s)" in text


class FakeSandbox:
    def __init__(self, store: CheckpointStore) -> None:
        self.checkpoint_store = store
        self.fail: str | None = None

    def checkpoint(self, name, after_cell=None):
        if self.fail:
            raise CheckpointError(self.fail)
        fake_checkpoint(self.checkpoint_store, name, after_cell=after_cell)

    def checkpoints(self):
        return self.checkpoint_store.list()


def test_undo_steps_keep_the_last_n_of_their_owner_and_go_with_it(tmp_path):
    store = CheckpointStore(tmp_path / "c")
    sb = FakeSandbox(store)
    keep = [2]
    mine, theirs = UndoSteps(sb, "kernel-1", lambda: keep[0]), UndoSteps(sb, lambda: "kernel/2", lambda: 5)
    with pytest.raises(SmolVMError, match="no cell has run"):
        mine.latest()
    for cell in (1, 2, 3):
        assert mine.before_cell(cell) is None
        mine.prune()
        time.sleep(0.01)
    theirs.before_cell(7)
    assert [s.after_cell for s in mine.steps()] == [2, 3]           # the newest two, this owner's only
    step = mine.latest()
    assert step.after_cell == 3 and mine.now_at(step) == 1     # the VM is that step now
    assert mine.latest().after_cell == 2 and [s.after_cell for s in mine.steps()] == [2]   # skipped, removed
    sb.fail = "you have 10 checkpoints, the most ... allows"
    note = mine.before_cell(4)
    assert "no undo step before this cell: you have 10 checkpoints" in note
    assert mine.before_cell(5) is None                               # said once, not before every cell
    mine.clear()
    assert mine.steps() == [] and len(theirs.steps()) == 1 and theirs.prefix == "undo-kernel2-"
    keep[0] = 0
    with pytest.raises(SmolVMError, match="undo steps are off.*--undo 5"):
        mine.latest()
    assert UndoSteps(sb, "never-used", lambda: 1).clear() is None    # took nothing: lists nothing
    # a step taken ahead (when a cell ended) is the state now until a cell runs after it
    keep[0] = 3
    sb.fail = None
    mine.before_cell(8)
    time.sleep(0.01)
    mine.before_cell(9, ahead=True)
    assert mine.latest().after_cell == 8 and [s.after_cell for s in mine.steps()] == [8]
    mine.before_cell(10, ahead=True)
    mine.used()
    assert mine.latest().after_cell == 10


def test_a_ready_snapshot_forks_ram_is_named_in_the_saved_meta(tmp_path):
    store = CheckpointStore(tmp_path / "c")
    fake_checkpoint(store, "cold", ram_named=False)
    ck = store.open("cold")
    assert not ck.ram_named and not ck.load().ram_named
    assert Path(ck.state).name == "state.bin"
