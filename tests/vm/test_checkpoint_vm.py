"""Checkpoints, restore, undo and fork of a live VM, in real VMs (vm/checkpoints.py)."""

from __future__ import annotations

import os
import re

import pytest
from jupyter_client.manager import start_new_kernel

from smolvm_kernel.errors import ConfigError
from smolvm_kernel.vm.checkpoints import CheckpointError
from smolvm_kernel.vm.sandbox import Sandbox


def out(sb: Sandbox, code: str) -> str:
    outs = list(sb.execute(code))
    errors = [o.text for o in outs if o.type == "error"]
    assert not errors, errors
    return "".join(o.text for o in outs if o.type in ("stream", "execute_result")).strip()


def run(kc, code, timeout=120):
    outs = []
    reply = kc.execute_interactive(code, output_hook=lambda m: outs.append(m), timeout=timeout)
    text = "".join(m["content"].get("text", "") for m in outs if m["msg_type"] == "stream")
    errors = [m["content"] for m in outs if m["msg_type"] == "error"]
    return reply["content"], text, errors


def vmm_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if b"qemu-system" in fh.read().split(b"\0")[0]:
                        pids.add(int(entry))
            except OSError:
                continue
    return pids


def test_a_restore_brings_back_the_whole_state_with_a_new_key(sandbox_factory):
    sb = sandbox_factory(workdir_mode="off")
    out(sb, "import threading, time, random\n"
            "x = 41\n"
            "open('notes.txt', 'w').write('first draft')\n"
            "ticks = [0]\n"
            "def tick():\n"
            "    while True:\n"
            "        ticks[0] += 1; time.sleep(0.01)\n"
            "threading.Thread(target=tick, daemon=True).start()\n"
            "time.sleep(0.3)")
    key = sb.guest_key
    ck = sb.checkpoint("draft", after_cell=1)
    assert ck.name == "draft" and ck.after_cell == 1 and ck.size > 0
    assert oct(os.stat(ck.directory).st_mode & 0o777) == "0o700"
    assert all(oct(os.stat(p).st_mode & 0o777) == "0o600" for p in ck.directory.iterdir())
    later = int(out(sb, "time.sleep(0.5); x = 0; open('notes.txt', 'w').write('ruined'); print(ticks[0])"))
    draws = {out(sb, "print(random.random())")}

    for _ in range(2):      # a checkpoint restores more than once: the kernel takes a key each time
        sb.restore("draft")
        assert sb.started_from == "checkpoint 'draft'"
        assert sb.guest_key != key
        key = sb.guest_key
        x, notes, ticked, alive = out(sb, "print(x, open('notes.txt').read().replace(' ', '_'), ticks[0], "
                                          "threading.active_count())").split()
        assert (x, notes) == ("41", "first_draft")
        assert int(ticked) < later          # the thread's counter is the checkpoint's, and it runs on
        assert int(out(sb, "time.sleep(0.2); print(ticks[0])")) > int(ticked)
        draws.add(out(sb, "print(random.random())"))
    assert len(draws) == 3                  # each restore reseeds the generators
    sb.remove_checkpoint("draft")
    assert not ck.directory.exists()


def test_fork_makes_independent_vms_that_share_one_memory_image(sandbox_factory):
    sb = sandbox_factory(workdir_mode="off")
    out(sb, "import random, os\nmodel = {'weights': [1, 2, 3]}")
    ck = sb.checkpoint("trained")
    before = vmm_pids()
    forks = sb.fork(ck, 3)
    try:
        assert len(vmm_pids() - before) == 3
        assert {out(f, "print(model['weights'])") for f in forks} == {"[1, 2, 3]"}
        draws = {out(f, "print(random.random(), os.urandom(8).hex())") for f in forks}
        keys = {f.guest_key for f in forks} | {sb.guest_key}
        assert len(draws) == 3 and len(keys) == 4          # no randomness, no key in common
        ram = ck.directory / "ram.bin"
        assert ram.exists() and not (ck.directory / "ram.bin.tmp").exists()
        inode = os.stat(ram).st_ino
        for f in forks:      # each VMM maps the checkpoint's one RAM file, privately
            maps = open(f"/proc/{f.backend.pid}/maps").read()
            mapped = [line for line in maps.splitlines() if str(ram) in line]
            assert mapped and all(" " + str(inode) + " " in line for line in mapped), mapped[:2]
            assert all(line.split()[1][3] == "p" for line in mapped)
        out(forks[0], "model['weights'].append(4)")        # forks diverge
        assert out(forks[1], "print(model['weights'])") == "[1, 2, 3]"
        # the original goes on; a restore from the materialized checkpoint works too
        sb.restore(ck)
        assert out(sb, "print(model['weights'])") == "[1, 2, 3]"
    finally:
        for f in forks:
            f.stop()
    sb.remove_checkpoint(ck.name)


def test_refusals_name_their_reason(sandbox_factory, tmp_path, monkeypatch):
    sb = sandbox_factory(workdir_mode="off")
    with pytest.raises(CheckpointError, match="is not a checkpoint name"):
        sb.checkpoint("../escape")
    with pytest.raises(CheckpointError, match="there is no checkpoint 'nope'"):
        sb.restore("nope")
    other = Sandbox(workdir_mode="off", mem_mib=384)
    sb.checkpoint("shape")
    with pytest.raises(CheckpointError, match="512 MiB.*384 MiB"):
        other.restore("shape")
    assert other.state.value == "stopped"            # refused before anything started
    with pytest.raises(ConfigError, match="between 1 and 64"):
        sb.fork("shape", 0)
    # a checkpoint another user could have written is never loaded
    ck = sb.checkpoint_store.open("shape")
    os.chmod(ck.state, 0o620)
    with pytest.raises(CheckpointError, match="only you can write"):
        sb.restore("shape")
    assert "shape" not in [c.name for c in sb.checkpoints()]
    os.chmod(ck.state, 0o600)
    sb.remove_checkpoint("shape")
    assert not ck.directory.exists()


def test_the_policy_caps_checkpoints(image, tmp_path_factory, monkeypatch):
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    os.chmod(policy.parent, 0o755)
    monkeypatch.setenv("SMOLVM_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    monkeypatch.setenv("SMOLVM_POLICY_FILE", str(policy))
    policy.write_text("max_checkpoints = 1\n")
    sb = Sandbox(workdir_mode="off")
    try:
        sb.start()
        sb.checkpoint("one")
        sb.checkpoint("one")                 # replacing one is not a second one
        with pytest.raises(CheckpointError, match=r"you have 1 checkpoints.*max_checkpoints = 1"):
            sb.checkpoint("two")
        sb.remove_checkpoint("one")
        policy.write_text("max_checkpoint_mib = 1\n")
        sb.checkpoint_store = Sandbox(workdir_mode="off").checkpoint_store      # the policy as it is now
        with pytest.raises(CheckpointError, match=r"MiB, over the 1 MiB .*max_checkpoint_mib"):
            sb.checkpoint("big")
        assert sb.checkpoints() == [] and [p.name for p in sb.checkpoint_store.root.iterdir()
                                           if not p.name.endswith(".lock")] == []    # nothing left of it
        policy.write_text("max_checkpoints = 0\n")
        sb.checkpoint_store = Sandbox(workdir_mode="off").checkpoint_store
        with pytest.raises(CheckpointError, match=r"switched off by the instructor's policy"):
            sb.checkpoint("any")
    finally:
        sb.stop()


def test_fifty_cycles_leave_nothing_behind(sandbox_factory, state_dir):
    sb = sandbox_factory(workdir_mode="off")
    out(sb, "n = 0")
    root = sb.checkpoint_store.root
    files = set(root.iterdir()) if root.exists() else set()
    fds = len(os.listdir("/proc/self/fd"))
    vmms = vmm_pids()
    vms = os.path.join(state_dir, "vms")
    run_dirs = set(os.listdir(vms))
    for i in range(50):
        sb.checkpoint("cycle")
        out(sb, "n += 1")
        sb.restore("cycle")
    assert out(sb, "print(n)") == "0"
    sb.remove_checkpoint("cycle")
    assert len(vmm_pids() - vmms) == 1 and len(vmm_pids()) == len(vmms)      # one VMM replaced the first
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert {p for p in root.iterdir() if not p.name.endswith(".lock")} == {p for p in files
                                                                         if not p.name.endswith(".lock")}
    assert len(set(os.listdir(vms)) - run_dirs) == 1 and len(os.listdir(vms)) == len(run_dirs)


def test_a_notebook_checkpoints_restores_undoes_and_branches(kernelspec, notebook_dir):
    from smolvm_kernel.vm.checkpoints import CheckpointStore

    before = {c.name for c in CheckpointStore().list()}
    km, kc = start_new_kernel(kernel_name=kernelspec, startup_timeout=60, cwd=str(notebook_dir))
    km2 = kc2 = None
    try:
        kernel_id = km.kernel_id
        reply, text, errors = run(kc, "df = list(range(10))\nlen(df)")
        assert reply["status"] == "ok", (reply, errors)
        reply, text, _ = run(kc, "%smolvm checkpoint before-cleaning")
        assert reply["status"] == "ok" and re.search(r"checkpoint 'before-cleaning' saved in [\d.]+ s", text), text
        run(kc, "df = df[5:]")
        reply, text, _ = run(kc, "%smolvm checkpoints")
        assert "before-cleaning" in text and "MiB" in text, text
        reply, text, _ = run(kc, "%smolvm restore before-cleaning")
        assert reply["status"] == "ok", reply
        assert re.search(r"restored 'before-cleaning', taken \d+ s ago after cell \[\d+\], in [\d.]+ s", text), text
        assert "not rolled back" in text
        reply, text, _ = run(kc, "print(len(df))")
        assert text.strip() == "10" and km.kernel_id == kernel_id and km.is_alive()

        # undo: a step before each cell
        reply, text, _ = run(kc, "%smolvm config --undo 3")
        assert reply["status"] == "ok", reply
        run(kc, "total = sum(df)")
        run(kc, "total = -1   # the destructive cell")
        reply, text, _ = run(kc, "%smolvm undo")
        assert reply["status"] == "ok" and "undone" in text, (reply, text)
        assert run(kc, "print(total)")[1].strip() == "45"
        for _ in range(2):       # each undo undoes the last cell: the print, then `total = sum(df)`
            reply, text, errors = run(kc, "%smolvm undo")
            assert reply["status"] == "ok", (reply, errors)
        reply, text, errors = run(kc, "total")
        assert reply["status"] == "error" and errors and errors[0]["ename"] == "NameError"
        # cells sent at once (Run All) each get their step after the one before has finished
        first, second = kc.execute("import time; time.sleep(1); a = 1"), kc.execute("a = 2")
        replies = {}
        while len(replies) < 2:
            msg = kc.get_shell_msg(timeout=60)
            replies[msg["parent_header"]["msg_id"]] = msg["content"]
        assert [replies[m]["status"] for m in (first, second)] == ["ok", "ok"]
        reply, text, _ = run(kc, "%smolvm undo")
        assert f"back to its state after cell [{replies[first]['execution_count']}]" in text, text
        assert run(kc, "print(a)")[1].strip() == "1"

        # a second notebook of the same user branches from the first one's checkpoint
        km2, kc2 = start_new_kernel(kernel_name=kernelspec, startup_timeout=60, cwd=str(notebook_dir))
        reply, text, _ = run(kc2, "%smolvm restore before-cleaning")
        assert reply["status"] == "ok", reply
        run(kc2, "df.append('branch two')")
        run(kc, "df.append('branch one')")
        assert run(kc2, "print(df[-1])")[1].strip() == "branch two"
        assert run(kc, "print(df[-1])")[1].strip() == "branch one"
        reply, text, errors = run(kc, "%smolvm checkpoint --rm before-cleaning")
        assert reply["status"] == "ok" and "removed checkpoint 'before-cleaning'" in text, (reply, errors)
    finally:
        for m, c in ((km, kc), (km2, kc2)):
            if c is not None:
                c.stop_channels()
                m.shutdown_kernel(now=False)
    # the kernels' undo steps went with them, and the removed checkpoint is gone
    assert {c.name for c in CheckpointStore().list()} == before
