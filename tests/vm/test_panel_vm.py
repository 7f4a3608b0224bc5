"""The control panel and the host's %smolvm lines against real VMs, driven over
the Jupyter protocol exactly as a browser drives them (comm messages)."""

from __future__ import annotations

import time

import pytest
from jupyter_client.manager import start_new_kernel

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class PanelClient:
    """Keeps the widget states the frontend would hold, from IOPub."""

    def __init__(self, kc) -> None:
        self.kc = kc
        self.states: dict[str, dict] = {}
        self.seen: list[dict] = []

    def run(self, code: str, timeout: float = 180):
        outs = []
        reply = self.kc.execute_interactive(code, output_hook=lambda m: (outs.append(m), self._track(m)),
                                            timeout=timeout)
        return reply["content"], outs

    def _track(self, msg: dict) -> None:
        self.seen.append(msg)
        c = msg["content"]
        if msg["msg_type"] == "comm_open" and c.get("target_name") == "jupyter.widget":
            self.states[c["comm_id"]] = dict(c["data"]["state"])
        elif msg["msg_type"] == "comm_msg" and c["comm_id"] in self.states:
            if c["data"].get("method") in ("update", "echo_update"):
                self.states[c["comm_id"]].update(c["data"]["state"])

    def pump(self, until, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while not until():
            left = end - time.monotonic()
            assert left > 0, f"timed out; panel state: {self.state()}"
            try:
                self._track(self.kc.get_iopub_msg(timeout=min(left, 1.0)))
            except Exception:  # queue.Empty
                pass

    def find(self, css_class: str | None = None, description: str | None = None) -> str:
        for cid, st in self.states.items():
            if css_class and css_class in st.get("_dom_classes", ()):
                return cid
            if description and st.get("description") == description and st.get("_model_name") == "ButtonModel":
                return cid
        raise KeyError(css_class or description)

    def state(self) -> str:
        value = self.states[self.find("smolvm-state")]["value"]
        return value.split("smolvm-state-")[1].split("'")[0] if "smolvm-state-" in value else value

    def message(self) -> str:
        return self.states[self.find("smolvm-message")]["value"]

    def send(self, comm_id: str, data: dict) -> None:
        self.kc.shell_channel.send(self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data}))

    def click(self, description: str) -> None:
        self.send(self.find(description=description), {"method": "custom", "content": {"event": "click"}})

    def set_value(self, css_or_desc: str, value) -> None:
        cid = next(c for c, st in self.states.items() if st.get("description") == css_or_desc)
        self.send(cid, {"method": "update", "state": {"value": value}, "buffer_paths": []})
        self.states[cid]["value"] = value

    def confirm(self, description: str) -> None:
        self.click(description)
        text = self.find("smolvm-confirm-text")
        self.pump(lambda: "lost" in self.states[text]["value"], timeout=10)
        self.click("Confirm")


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
    assert client.run("open('marker', 'w').write('x'); x = 1")[0]["status"] == "ok"
    client.confirm("Reset")
    client.pump(lambda: client.state() in ("booting", "stopping"), timeout=30)
    client.pump(lambda: client.state() == "ready", timeout=180)
    content, outs = client.run("import os; print(os.path.exists('marker'), 'x' in dir())")
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
    for line, words in (("%smolvm push ../../etc/passwd", "outside the notebook's folder"),
                        ("%smolvm pull out.txt /etc/out.txt", "outside the notebook's folder"),
                        ("%smolvm pull /etc/hostname host.txt", "outside /home/user and /tmp"),
                        ("%smolvm pull ../../root/x y.txt", "outside /home/user and /tmp")):
        content, _ = client.run(line)
        assert content["status"] == "error" and words in content["evalue"], (line, content)
    assert not (workdir / "host.txt").exists() and not (workdir / "y.txt").exists()


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
    from smolvm_kernel.state import Registry
    pid = km.provisioner.process.pid
    assert [r for r in Registry().list() if r.owner_pid == pid] == []
    content, outs = client.run("print('z' in dir())")
    assert content["status"] == "ok" and stdout(outs).strip() == "False"
    client.pump(lambda: client.state() == "ready", timeout=30)
