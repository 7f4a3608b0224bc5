"""The kernel's host side over real ZMQ sockets, with a fake VM behind it.

What is checked here is the host's own logic (host comms for the panel,
ordering of %smolvm lines and cells, the stopped policy, push/pull
confinement); tests/vm/test_panel_vm.py does the same against real VMs.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.session import Session

from smolvm_guest.wire import Channel
from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.jupyter.kernel import SmolVMKernel

from support import FakeVM, wait_for

GUEST_KEY = b"k" * 64


class FakeSandbox(FakeVM):
    """Sandbox-shaped: answers execute_request at once, or when released."""

    boot_seconds = 0.01

    def __init__(self, config, progress=None) -> None:
        super().__init__(config)
        self.guest_key = GUEST_KEY
        self.session = Session(key=GUEST_KEY, check_pid=False)
        self.on_guest_frame = self.on_death = None
        self.kernel_info = {}
        self.start_notes = []
        self.hold = threading.Event()
        self.hold.set()
        self.count = 0
        self.audit_context = {"kernel_id": "k-test"}
        self.vm_id = "vm-test"

    def stats(self):
        return {"state": self.state.value, "vcpus": self.config.vcpus, "mem_total_kib": 1000,
                "mem_available_kib": 500, "configured_mem_mib": self.config.mem_mib}

    def interrupt(self):
        self.calls.append("interrupt")

    def pause_reading(self, pause):
        self.calls.append("pause" if pause else "resume")

    def get_file(self, remote, max_bytes):
        return self.files[remote]

    def send_raw(self, chan, parts):
        _, msg_list = self.session.feed_identities(parts)
        msg = self.session.deserialize(msg_list)
        parent = msg["header"]
        if msg["msg_type"] == "comm_info_request":
            self.emit(Channel.SHELL, "comm_info_reply", {"status": "ok", "comms": {
                "g1": {"target_name": "jupyter.widget"}}}, parent)
            return
        if msg["msg_type"] == "comm_open" and msg["content"].get("target_name") == "jupyter.widget.control":
            self.emit(Channel.IOPUB, "comm_msg", {"comm_id": msg["content"]["comm_id"], "data": {
                "method": "update_states", "states": {"g1": {"state": {}}}, "buffer_paths": []}}, parent)
            return
        if msg["msg_type"] != "execute_request":
            return
        code = msg["content"]["code"]

        def answer():
            if code == "hold":
                self.hold.wait(10)
            self.count += 1
            self.emit(Channel.IOPUB, "status", {"execution_state": "busy"}, parent)
            self.emit(Channel.IOPUB, "stream", {"name": "stdout", "text": f"ran {code}\n"}, parent)
            self.emit(Channel.SHELL, "execute_reply", {"status": "ok", "execution_count": self.count}, parent)
            self.emit(Channel.IOPUB, "status", {"execution_state": "idle"}, parent)
        threading.Thread(target=answer, daemon=True).start()

    def emit(self, chan, mtype, content, parent):
        msg = self.session.msg(mtype, content=content, parent=parent)
        ident = [b"kernel.x." + mtype.encode()] if chan == Channel.IOPUB else []
        self.on_guest_frame(chan, self.session.serialize(msg, ident=ident))


def _stop(kernel: SmolVMKernel, thread: threading.Thread) -> None:
    """End a kernel served on ``thread`` and close its sockets."""
    kernel.exiting = True
    thread.join(5)
    for sock in kernel.sockets.values():
        sock.close(linger=0)


@pytest.fixture
def running(tmp_path):
    conn_file = str(tmp_path / "kernel.json")
    write_connection_file(conn_file, key=b"host-key")
    import json
    info = json.loads(Path(conn_file).read_text())
    workdir = tmp_path / "notebooks"
    workdir.mkdir()

    def make(factory=FakeSandbox, **cfg):
        config = SandboxConfig(**{"max_mem_mib": 2048, **cfg})
        kernel = SmolVMKernel(info, config, sandbox_factory=factory, workdir=str(workdir))
        thread = threading.Thread(target=kernel.run, daemon=True)
        thread.start()
        kc = BlockingKernelClient(connection_file=conn_file)
        kc.load_connection_file()
        kc.start_channels()
        made.append((kernel, kc, thread))
        return kernel, kc, workdir

    made = []
    yield make
    for kernel, kc, thread in made:
        kc.stop_channels()
        _stop(kernel, thread)


def run(kc, code, timeout=10):
    """Execute; return (reply content, stdout text, every iopub message)."""
    msgs = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
    text = "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")
    return reply["content"], text, msgs


def click(kc, comm_id):
    kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {
        "method": "custom", "content": {"event": "click"}}}))


def buttons(msgs) -> dict[str, str]:
    return {m["content"]["data"]["state"]["description"]: m["content"]["comm_id"] for m in msgs
            if m["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_model_name") == "ButtonModel"}


def test_panel_is_served_by_the_host_and_reset_goes_through_confirmation(running):
    kernel, kc, _ = running()
    content, _, msgs = run(kc, "%smolvm panel")
    assert content["status"] == "ok"
    opens = [m for m in msgs if m["msg_type"] == "comm_open"]
    assert opens and all(m["content"]["comm_id"].startswith("smolvmhost") for m in opens)
    views = [m for m in msgs if m["msg_type"] == "display_data"
             and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
    assert len(views) == 1
    ids = buttons(msgs)
    assert wait_for(lambda: kernel.vm_state() == "ready")
    click(kc, ids["Reset"])
    time.sleep(0.3)
    assert "reset" not in kernel.sandbox.calls      # not before the confirmation
    click(kc, ids["Confirm"])
    assert wait_for(lambda: "reset" in kernel.sandbox.calls)
    assert wait_for(lambda: kernel.vm_state() == "ready")
    click(kc, ids["Teardown"])
    click(kc, ids["Confirm"])
    assert wait_for(lambda: kernel.vm_state() == "stopped")
    assert wait_for(lambda: "smolvm-state-stopped" in kernel.panel.state.value, 3)


def test_host_line_waits_for_the_cells_sent_before_it(running):
    kernel, kc, _ = running()
    run(kc, "pass")
    kernel.sandbox.hold.clear()
    order = []
    first = kc.execute("hold")
    second = kc.execute("%smolvm config")
    third = kc.execute("after")
    time.sleep(0.5)
    kernel.sandbox.hold.set()
    counts = []
    for _ in range(3):
        reply = kc.get_shell_msg(timeout=10)
        order.append(reply["parent_header"]["msg_id"])
        counts.append(reply["content"]["execution_count"])
    assert order == [first, second, third]
    # The host line is numbered by the guest (as a comment in its history),
    # so the notebook's counts run on without gaps or repeats.
    assert counts == [2, 3, 4]


def test_every_execute_reply_has_a_real_count(running):
    # JupyterLab keeps a cell at [*] when its reply's execution_count is 0 or null.
    kernel, kc, _ = running(on_stopped="error")
    counts = [run(kc, "a")[0]["execution_count"], run(kc, "%smolvm help")[0]["execution_count"]]
    run(kc, "%smolvm stop")
    counts.append(run(kc, "b")[0]["execution_count"])     # refused: no VM to number it
    assert all(isinstance(c, int) and c > 0 for c in counts) and counts == sorted(set(counts))


def test_on_stopped_error_refuses_cells_until_start(running):
    kernel, kc, _ = running(on_stopped="error")
    assert run(kc, "x = 1")[0]["status"] == "ok"
    _, text, _ = run(kc, "%smolvm stop")
    assert "%smolvm start" in text
    content, _, _ = run(kc, "x")
    assert content["status"] == "error" and "torn down" in content["evalue"]
    calls = list(kernel.sandbox.calls)
    kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": "guest-widget", "data": {}}))
    time.sleep(0.3)
    assert kernel.sandbox.calls == calls and kernel.vm_state() == "stopped"   # no VM for a stray event
    run(kc, "%smolvm start")
    assert run(kc, "x")[0]["status"] == "ok"


def test_config_line_validates_against_the_host_limits(running):
    kernel, kc, _ = running()
    run(kc, "pass")
    content, _, _ = run(kc, "%smolvm config --mem 4096")
    assert content["status"] == "error" and "limit of 2048 MiB" in content["evalue"]
    content, text, _ = run(kc, "%smolvm config --timeout 30")
    assert content["status"] == "ok" and "without a restart" in text and kernel.config.exec_timeout == 30
    calls = len(kernel.sandbox.calls)
    content, text, _ = run(kc, "%smolvm config --mem 1024 --cpus 1")
    assert "restarting" in text and kernel.sandbox.config.mem_mib == 1024
    assert wait_for(lambda: "reset" in kernel.sandbox.calls[calls:])
    content, _, _ = run(kc, "%smolvm config --bogus 1")
    assert content["status"] == "error" and "--bogus" in content["evalue"]


def test_push_and_pull_stay_in_the_notebook_folder(running, tmp_path):
    kernel, kc, workdir = running()
    run(kc, "pass")
    (workdir / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "secret").write_text("host secret")
    (workdir / "link").symlink_to(tmp_path / "secret")
    content, text, _ = run(kc, "%smolvm push data.csv")
    assert content["status"] == "ok" and "pushed data.csv" in text
    assert kernel.sandbox.files["data.csv"] == b"a,b\n1,2\n"
    for line in ("%smolvm push ../secret", f"%smolvm push {tmp_path}/secret", "%smolvm push link",
                 "%smolvm pull data.csv ../out.csv"):
        content, _, _ = run(kc, line)
        assert content["status"] == "error" and "outside the notebook's folder" in content["evalue"], line
    kernel.sandbox.files["result.txt"] = b"42\n"
    content, text, _ = run(kc, "%smolvm pull result.txt")
    assert content["status"] == "ok" and (workdir / "result.txt").read_bytes() == b"42\n"
    content, text, _ = run(kc, "%smolvm pull result.txt")      # the same bytes (the write-back's): fine
    assert content["status"] == "ok" and "already" in text
    kernel.sandbox.files["result.txt"] = b"43\n"
    content, _, _ = run(kc, "%smolvm pull result.txt")
    assert content["status"] == "error" and "--force" in content["evalue"]
    assert (workdir / "result.txt").read_bytes() == b"42\n"
    assert run(kc, "%smolvm pull result.txt --force")[0]["status"] == "ok"
    assert (workdir / "result.txt").read_bytes() == b"43\n"
    kernel.config.max_transfer_mib = 1
    (workdir / "big.bin").write_bytes(b"x" * (2 * 2**20))
    content, _, _ = run(kc, "%smolvm push big.bin")
    assert content["status"] == "error" and "push limit" in content["evalue"]


def test_a_new_iopub_subscriber_is_welcomed(running):
    import zmq

    kernel, kc, _ = running()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{kernel.info['iopub_port']}")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        assert sub.poll(5000), "no iopub_welcome"
        frames = sub.recv_multipart()
        msg = kc.session.deserialize(kc.session.feed_identities(frames)[1])
        assert msg["header"]["msg_type"] == "iopub_welcome"
    finally:
        sub.close(linger=0)


def test_a_reloaded_page_finds_the_panel_next_to_guest_widgets(running):
    kernel, kc, _ = running()
    run(kc, "pass")
    _, _, msgs = run(kc, "%smolvm panel")
    host_ids = {m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_open"}
    # the fallback path: comm_info for jupyter.widget lists both sides
    kc.shell_channel.send(kc.session.msg("comm_info_request", {"target_name": "jupyter.widget"}))
    reply = kc.get_shell_msg(timeout=10)
    assert reply["msg_type"] == "comm_info_reply"
    assert "g1" in reply["content"]["comms"] and host_ids <= set(reply["content"]["comms"])
    kc.shell_channel.send(kc.session.msg("comm_info_request", {"target_name": "other"}))
    assert not host_ids & set(kc.get_shell_msg(timeout=10)["content"]["comms"])
    # the control comm: the guest's update_states gains the host's widget states
    kc.shell_channel.send(kc.session.msg("comm_open", {"comm_id": "ctl1", "target_name": "jupyter.widget.control",
                                                       "data": {}}))
    while True:
        m = kc.get_iopub_msg(timeout=10)
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == "ctl1":
            break
    states = m["content"]["data"]["states"]
    assert "g1" in states and host_ids <= set(states)
    some = states[next(iter(host_ids))]
    assert some["model_module"] in ("@jupyter-widgets/controls", "@jupyter-widgets/base")


@pytest.mark.parametrize("early", [True, False], ids=["launcher listened", "kernel bound"])
def test_a_client_that_connects_before_the_kernel_is_served_at_once(tmp_path, early):
    """The launcher listens before the kernel imports anything: a client whose
    first connection came too early is answered without its 100-200 ms retry
    (here: without a retry at all, which comes after 10 minutes)."""
    import json

    import zmq

    from smolvm_kernel import launch

    conn_file = str(tmp_path / "kernel.json")
    write_connection_file(conn_file, key=b"host-key")
    info = json.loads(Path(conn_file).read_text())
    fds = launch.listen(info) if early else {}
    session = Session(key=b"host-key")
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.reconnect_ivl = 600_000
    client.linger = 0
    client.connect(f"tcp://127.0.0.1:{info['shell_port']}")
    session.send(client, "kernel_info_request", {})
    time.sleep(0.5)   # the client's connect has happened (and been refused without the launcher)
    kernel = SmolVMKernel(info, SandboxConfig(), sandbox_factory=FakeSandbox, listening=fds)
    thread = threading.Thread(target=kernel.run, daemon=True)
    thread.start()
    try:
        answered = client.poll(5000 if early else 1500)
        assert bool(answered) is early
        if early:
            reply = session.recv(client)[1]
            assert reply["msg_type"] == "kernel_info_reply"
            assert reply["content"]["implementation"] == "smolvm-kernel"
    finally:
        client.close()
        _stop(kernel, thread)


class SlowStartSandbox(FakeSandbox):
    def start(self):
        time.sleep(1.6)
        super().start()


@pytest.mark.parametrize("slow", [False, True])
def test_boot_progress_leaves_nothing_in_the_saved_outputs(running, slow):
    """A slow start shows a progress line and clears it before the cell's own
    outputs; a fast one shows nothing. Either way the outputs a notebook keeps
    (those after the last clear_output) are the cell's own."""
    import nbformat.v4 as nbf

    kernel, kc, _ = running(SlowStartSandbox if slow else FakeSandbox)
    content, text, msgs = run(kc, "print(1)")
    assert content["status"] == "ok" and text == "ran print(1)\n"
    types = [m["msg_type"] for m in msgs if m["msg_type"] != "status"]
    if slow:
        assert types == ["display_data", "clear_output", "stream"]
        assert "starting microVM" in msgs[[m["msg_type"] for m in msgs].index("display_data")][
            "content"]["data"]["text/plain"]
    else:
        assert types == ["stream"]
    kept = []
    for m in msgs:
        if m["msg_type"] == "clear_output":
            kept = []
        elif m["msg_type"] != "status":
            kept.append(nbf.output_from_msg(m))
    assert [o["output_type"] for o in kept] == ["stream"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the policy file must be root's: run as root")
def test_config_line_shows_the_instructors_caps_and_refuses_beyond_them(running, tmp_path, monkeypatch):
    from smolvm_kernel.host import policy

    monkeypatch.setattr(policy, "POLICY_FILE", str(tmp_path / "no-such-policy.toml"))
    path = tmp_path / "policy.toml"
    path.write_text('max_vcpus = 1\nnetwork = ["none"]\nmax_exec_timeout = 60\n')
    monkeypatch.setenv("SMOLVM_POLICY_FILE", str(path))
    kernel, kc, _ = running()
    kernel.config = kernel.config.validated()
    run(kc, "pass")
    content, text, _ = run(kc, "%smolvm config")
    assert content["status"] == "ok"
    assert f"caps from the instructor's policy ({path}): max_vcpus=1, max_exec_timeout=60, network=none" in text
    content, _, _ = run(kc, "%smolvm config --cpus 2")
    assert content["status"] == "error" and "above the cap of 1 set by the instructor's policy" in content["evalue"]
    content, _, _ = run(kc, "%smolvm config --network nat")
    assert content["status"] == "error" and "not allowed by the instructor's policy" in content["evalue"]
    content, _, _ = run(kc, "%smolvm config --timeout 0")
    assert content["status"] == "error" and "at most 60 s per cell" in content["evalue"]
    assert kernel.config.vcpus == 1 and kernel.config.network == "none"
    refused = [e for e in kernel.sandbox.audit.read() if e["event"] == "refused"]
    assert len(refused) == 3 and refused[0]["kernel_id"] == "k-test"
    assert "cap of 1 set by the instructor's policy" in refused[0]["why"]


def test_a_cell_past_its_timeout_is_interrupted_then_the_vm_replaced(running, monkeypatch):
    """exec_timeout: a note and an interrupt first; a guest that ignores it
    loses its VM (on record), and the next cell starts a fresh one."""
    from smolvm_kernel.vm import sandbox

    monkeypatch.setattr(sandbox, "INTERRUPT_GRACE_S", 0.5)
    kernel, kc, _ = running(exec_timeout=0.5)
    run(kc, "pass")
    kernel.sandbox.hold.clear()
    try:
        content, _, msgs = run(kc, "hold")
    finally:
        kernel.sandbox.hold.set()
    notes = [m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"]
    assert notes == ["[smolvm] this cell exceeded its 0.5 s timeout; interrupting it\n"]
    assert content["status"] == "error" and content["ename"] == "ExecutionTimeout"
    assert "interrupt" in kernel.sandbox.calls
    assert wait_for(lambda: kernel.sandbox.calls[-1] == "stop")      # right after the reply
    deaths = [e for e in kernel.sandbox.audit.read() if e["event"] == "death"]
    assert len(deaths) == 1 and deaths[0]["cause"].startswith("timeout: a cell ran past exec_timeout=0.5 s")
    assert deaths[0]["vm_id"] == "vm-test" and deaths[0]["kernel_id"] == "k-test"
    assert run(kc, "after")[0]["status"] == "ok" and kernel.sandbox.calls[-1] == "start"


def test_a_vm_death_ends_the_waiting_cell_and_the_next_cell_gets_a_fresh_vm(running):
    from smolvm_kernel.errors import GuestDied

    kernel, kc, _ = running()
    run(kc, "pass")
    kernel.sandbox.hold.clear()
    msg_id = kc.execute("hold")
    time.sleep(0.3)
    kernel.sandbox.state = kernel.sandbox.States.DEAD
    kernel.sandbox.on_death(GuestDied("the microVM exited (test)"))
    reply = kc.get_shell_msg(timeout=10)
    kernel.sandbox.hold.set()
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error" and "the microVM exited (test)" in reply["content"]["evalue"]
    assert wait_for(lambda: kernel.vm_state() == "dead")
    assert run(kc, "again")[0]["status"] == "ok" and kernel.sandbox.calls[-1] == "reset"


def test_a_stopped_vmm_ends_the_running_cell_and_is_on_record(running):
    """A VMM stopped by SIGSTOP runs no guest: the cell that waits on it gets
    the cause, the audit log a death, and the VM is destroyed."""
    import signal
    import subprocess
    from types import SimpleNamespace

    vmm = subprocess.Popen(["sleep", "60"])
    try:
        kernel, kc, _ = running()
        run(kc, "pass")
        kernel.sandbox.backend = SimpleNamespace(pid=vmm.pid, name="fake", spec=SimpleNamespace(accel="none"))
        kernel.sandbox.hold.clear()
        os.kill(vmm.pid, signal.SIGSTOP)
        try:
            content, _, _ = run(kc, "hold")
        finally:
            kernel.sandbox.hold.set()
        assert content["status"] == "error" and f"VMM (pid {vmm.pid}) is stopped (SIGSTOP" in content["evalue"]
        deaths = [e for e in kernel.sandbox.audit.read() if e["event"] == "death"]
        assert len(deaths) == 1 and "is stopped (SIGSTOP or a debugger)" in deaths[0]["cause"]
        assert wait_for(lambda: kernel.sandbox.calls[-1] == "stop")
    finally:
        vmm.kill()
        vmm.wait()


def test_lines_that_start_reset_and_report_on_the_vm(running):
    kernel, kc, _ = running()
    run(kc, "pass")
    _, text, _ = run(kc, "%smolvm start")
    assert text == "the microVM is already running\n"
    content, text, _ = run(kc, "%smolvm reset")
    assert content["status"] == "ok"
    assert text == "resetting: a fresh microVM is starting; the next cell runs in it\n"
    assert wait_for(lambda: kernel.sandbox.calls[-1] == "reset")
    _, text, _ = run(kc, "%smolvm status")
    assert text.startswith("state      ready") and "memory     0 MiB used of 1 MiB" in text
    _, text, _ = run(kc, "%smolvm stop")
    assert text == "microVM stopped; the next cell starts a fresh one\n"
    assert wait_for(lambda: kernel.vm_state() == "stopped")
    _, text, _ = run(kc, "%smolvm config --cpus 1 --mem 1024")
    assert text == "saved vCPUs 1, memory 1024 MiB; the VM is stopped and starts with them next time\n"
    assert kernel.sandbox.calls[-1] == "stop" and kernel.config.mem_mib == 1024
    _, text, _ = run(kc, "%smolvm start")
    assert text == "starting a fresh microVM; the next cell runs in it\n"
    assert wait_for(lambda: kernel.vm_state() == "ready") and kernel.sandbox.calls[-1] == "start"


def test_a_wrong_setting_fails_every_start_with_what_to_fix(tmp_path):
    """A config file or SMOLVM_* value that is wrong: the kernel runs, and each
    cell says what to fix instead of booting a VM with the defaults."""
    import json

    from smolvm_kernel.errors import ConfigError

    conn_file = str(tmp_path / "kernel.json")
    write_connection_file(conn_file, key=b"host-key")
    info = json.loads(Path(conn_file).read_text())
    error = ConfigError("", None, "SMOLVM_MEM='lots' is not a number. Fix the setting, then restart the kernel.")
    kernel = SmolVMKernel(info, SandboxConfig(), sandbox_factory=FakeSandbox, config_error=error)
    thread = threading.Thread(target=kernel.run, daemon=True)
    thread.start()
    kc = BlockingKernelClient(connection_file=conn_file)
    kc.load_connection_file()
    kc.start_channels()
    try:
        for _ in range(2):
            content, _, _ = run(kc, "1")
            assert content["status"] == "error" and "SMOLVM_MEM='lots'" in content["evalue"]
        assert kernel.sandbox.calls == []
    finally:
        kc.stop_channels()
        _stop(kernel, thread)


def test_every_request_the_host_answers_is_framed_by_one_busy_and_one_idle(running):
    """As ipykernel's kernelbase does, for shell and control alike (Jupyter
    servers do not count interrupt or shutdown statuses as activity)."""
    kernel, kc, _ = running()
    run(kc, "pass")

    def statuses(msg_id: str) -> list[str]:
        got = []
        while "idle" not in got:
            m = kc.get_iopub_msg(timeout=10)
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status":
                got.append(m["content"]["execution_state"])
        time.sleep(0.2)
        while True:         # nothing more for it
            try:
                m = kc.get_iopub_msg(timeout=0.1)
            except Exception:
                return got
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status":
                got.append(m["content"]["execution_state"])

    assert statuses(kc.kernel_info()) == ["busy", "idle"]
    assert statuses(kc.execute("%smolvm help")) == ["busy", "idle"]
    for mtype, content in (("interrupt_request", {}), ("shutdown_request", {"restart": False})):
        msg = kc.session.msg(mtype, content)
        kc.control_channel.send(msg)
        assert kc.get_control_msg(timeout=10)["msg_type"] == mtype.replace("_request", "_reply")
        assert statuses(msg["header"]["msg_id"]) == ["busy", "idle"], mtype
    assert wait_for(lambda: kernel.exiting)
