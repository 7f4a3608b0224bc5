"""The control panel and the host's %smolvm lines against real VMs, driven over
the Jupyter protocol exactly as a browser drives them (comm messages)."""

from __future__ import annotations

import pytest
from jupyter_client.manager import start_new_kernel
from panel_client import PanelClient

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def panel_kernel(kernelspec, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("notebook-folder")
    km, kc = start_new_kernel(kernel_name=kernelspec, startup_timeout=60, cwd=str(workdir))
    client = PanelClient(kc)
    client.run("pass")
    content, outs = client.run("%smolvm panel")
    assert content["status"] == "ok"
    assert any(WIDGET_VIEW in m["content"].get("data", {}) for m in outs if m["msg_type"] == "display_data")
    client.pump(lambda: client.state() == "ready", timeout=30)
    yield km, client, workdir
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def stdout(outs) -> str:
    return "".join(m["content"]["text"] for m in outs if m["msg_type"] == "stream"
                   and m["content"]["name"] == "stdout")


def test_panel_shows_live_figures_from_the_guest(panel_kernel):
    _, client, _ = panel_kernel
    details = client.find("smolvm-details")
    client.pump(lambda: "MiB used of" in client.states[details]["value"], timeout=30)
    value = client.states[details]["value"]
    assert "qemu / " in value and "transport serial" in value and "off" in value


def test_reset_from_the_panel_wipes_the_guest(panel_kernel):
    _, client, _ = panel_kernel
    # /tmp: the working folder's files come back and outlive a reset (vm/workdir.py)
    assert client.run("open('/tmp/marker', 'w').write('x'); x = 1")[0]["status"] == "ok"
    client.confirm("Reset")
    client.pump(lambda: client.state() in ("booting", "stopping"), timeout=30)
    client.pump(lambda: client.state() == "ready", timeout=180)
    content, outs = client.run("import os; print(os.path.exists('/tmp/marker'), 'x' in dir())")
    assert stdout(outs).strip() == "False False"


def test_guest_cannot_restate_the_panel(panel_kernel):
    _, client, _ = panel_kernel
    state_id = client.find("smolvm-state")
    code = ("from ipykernel.comm import Comm\n"
            f"c = Comm(target_name='jupyter.widget', comm_id={state_id!r}, data={{'state': {{}}}})\n"
            "c.send({'method': 'update', 'state': {'value': 'forged'}})\n"
            "print('sent')")
    content, outs = client.run(code)
    assert stdout(outs).strip() == "sent"
    leaked = [m for m in outs if m["msg_type"].startswith("comm_") and m["content"].get("comm_id") == state_id]
    assert leaked == [] and "forged" not in client.states[state_id]["value"]


def test_out_of_range_memory_is_refused_in_the_panel(panel_kernel):
    _, client, _ = panel_kernel
    client.set_value("memory (MiB)", 10 ** 7)
    client.click("Apply")
    client.pump(lambda: "limit" in client.message() or "out of range" in client.message(), timeout=10)
    assert client.state() == "ready"
    client.set_value("memory (MiB)", 512)


def test_push_pull_round_trip_and_confinement(panel_kernel):
    _, client, workdir = panel_kernel
    payload = bytes(range(256)) * 4096            # 1 MiB, every byte value
    (workdir / "in.bin").write_bytes(payload)
    content, outs = client.run("%smolvm push in.bin data/in.bin")
    assert content["status"] == "ok", content
    content, outs = client.run("import hashlib; print(hashlib.sha256(open('data/in.bin','rb').read()).hexdigest())")
    import hashlib
    assert stdout(outs).strip() == hashlib.sha256(payload).hexdigest()
    client.run("open('/tmp/out.txt', 'w').write('made in the VM')")
    content, _ = client.run("%smolvm pull /tmp/out.txt")
    assert content["status"] == "ok" and (workdir / "out.txt").read_text() == "made in the VM"
    # "~" is the guest user's home, as a user expects.
    client.run("open('/home/user/tilde.txt', 'w').write('from home')")
    content, outs = client.run("%smolvm pull ~/tilde.txt")
    assert content["status"] == "ok", content
    assert (workdir / "tilde.txt").read_text() == "from home" and "~/tilde.txt" in stdout(outs)
    content, _ = client.run("%smolvm push in.bin ~/copied.bin")
    assert content["status"] == "ok", content
    assert stdout(client.run("import os; print(os.path.getsize('/home/user/copied.bin'))")[1]).strip() \
        == str(len(payload))
    for line, words in (("%smolvm push ../../etc/passwd", "outside the notebook's folder"),
                        ("%smolvm pull out.txt /etc/out.txt", "outside the notebook's folder"),
                        ("%smolvm pull /etc/hostname host.txt", "outside /home/user and /tmp"),
                        ("%smolvm pull ../../root/x y.txt", "outside /home/user and /tmp")):
        content, _ = client.run(line)
        assert content["status"] == "error" and words in content["evalue"], (line, content)
    assert not (workdir / "host.txt").exists() and not (workdir / "y.txt").exists()


def test_smaller_memory_on_a_snapshot_fork_asks_for_a_restart(panel_kernel):
    """The panel's VM was restored from the ready snapshot: its balloon would
    punch holes in the RAM file other VMs share (QemuBackend.balloon_refusal),
    so a smaller size is not applied live but offered as a restart."""
    _, client, _ = panel_kernel
    client.run("w = 1")
    client.set_value("memory (MiB)", 384)
    client.click("Apply")
    text = client.find("smolvm-confirm-text")
    client.pump(lambda: "restarts the VM" in client.states[text]["value"], timeout=10)
    assert "applied live" not in client.message()
    client.click("Cancel")
    client.set_value("memory (MiB)", 512)


def test_apply_new_memory_restarts_with_it(panel_kernel):
    _, client, _ = panel_kernel
    client.run("y = 2")
    client.set_value("memory (MiB)", 768)
    client.confirm("Apply")
    client.pump(lambda: client.state() != "ready", timeout=30)
    client.pump(lambda: client.state() == "ready", timeout=240)
    content, outs = client.run("print(int(open('/proc/meminfo').readline().split()[1]) // 1024, 'y' in dir())")
    mem, kept = stdout(outs).split()
    assert 640 < int(mem) <= 768 and kept == "False"


def test_teardown_then_the_next_cell_starts_a_fresh_vm(panel_kernel):
    km, client, _ = panel_kernel
    client.run("z = 3")
    client.confirm("Teardown")
    client.pump(lambda: client.state() == "stopped", timeout=60)
    from smolvm_kernel.host.registry import Registry
    pid = km.provisioner.process.pid
    assert [r for r in Registry().list() if r.owner_pid == pid] == []
    content, outs = client.run("print('z' in dir())")
    assert content["status"] == "ok" and stdout(outs).strip() == "False"
    client.pump(lambda: client.state() == "ready", timeout=30)


def test_checkpoint_restore_and_delete_from_the_panel(panel_kernel):
    import re

    _, client, _ = panel_kernel
    assert client.run("kept = 'before'")[0]["status"] == "ok"
    client.click("Checkpoint")
    client.pump(lambda: "saved in" in client.message(), timeout=60)
    name = re.search(r"checkpoint '([^']+)' saved", client.message()).group(1)
    listing = client.find("smolvm-checkpoint-list")
    client.pump(lambda: any(label.startswith(name + " (") for label in
                            client.states[listing].get("_options_labels", ())), timeout=30)
    labels = client.states[listing]["_options_labels"]
    client.send(listing, {"method": "update", "state": {"index": next(
        i for i, label in enumerate(labels) if label.startswith(name + " ("))}, "buffer_paths": []})
    assert client.run("kept = 'after'")[0]["status"] == "ok"
    client.confirm("Restore")
    client.pump(lambda: "restored" in client.message(), timeout=120)
    client.pump(lambda: client.state() == "ready", timeout=60)
    content, outs = client.run("print(kept)")
    assert stdout(outs).strip() == "before"
    client.confirm("Delete")
    client.pump(lambda: "removed checkpoint" in client.message(), timeout=60)
    client.pump(lambda: not any(label.startswith(name + " (") for label in
                                client.states[listing].get("_options_labels", ())), timeout=30)
