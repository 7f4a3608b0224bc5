"""The ``%smolvm`` line magic's host side, against a fake sandbox (no VM):
what each line does to its named sandbox and what it prints.
tests/vm/test_magic.py runs the same lines against real VMs."""

from __future__ import annotations

import pytest
from support import FakeVM

from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import SmolVMError


class FakeSandbox(FakeVM):
    """Sandbox-shaped, for the magic: starts, stops and files at once."""

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(SandboxConfig(**{"max_mem_mib": 2048, **overrides}))

    def stats(self):
        return {"state": self.state.value, "configured_vcpus": self.config.vcpus,
                "configured_mem_mib": self.config.mem_mib}


@pytest.fixture
def magic(monkeypatch, tmp_path):
    from smolvm_kernel.jupyter import magics
    from smolvm_kernel.vm import sandbox

    monkeypatch.setattr(sandbox, "Sandbox", FakeSandbox)
    monkeypatch.chdir(tmp_path)
    yield magics
    magics._actions.clear()
    magics._sandboxes.clear()


def test_lines_act_on_the_named_sandbox(magic, capsys, tmp_path):
    magic.smolvm_line("status --name u")
    assert capsys.readouterr().out == "no sandbox named 'u'; run a %%smolvm --name u cell first\n"
    magic.smolvm_line("config --name u --timeout 30")
    assert capsys.readouterr().out == "cell timeout 30.0 s: applied without a restart\n"
    sb = magic._sandboxes["u"]
    assert sb.config.exec_timeout == 30 and sb.calls == []
    magic.smolvm_line("config --name u --mem 1024")
    assert capsys.readouterr().out == "saved memory 1024 MiB; the VM is stopped and starts with them next time\n"
    (tmp_path / "in.txt").write_text("x")
    with pytest.raises(SmolVMError, match="sandbox 'u' is stopped; run a %%smolvm cell to start it"):
        magic.smolvm_line("push in.txt --name u")
    magic.smolvm_line("reset --name u")
    assert capsys.readouterr().out == "fresh microVM ready in 0.2 s\n"
    assert sb.calls == ["reset"] and sb.state.value == "ready"
    magic.smolvm_line("status --name u")
    assert capsys.readouterr().out.startswith("state      ready")
    magic.smolvm_line("push in.txt --name u")
    assert capsys.readouterr().out == "pushed in.txt (1 bytes) to the VM as ~/in.txt\n" and sb.files == {"in.txt": b"x"}
    with pytest.raises(SmolVMError, match="outside the notebook's folder"):
        magic.smolvm_line("push ../x --name u")
    magic.smolvm_line("list")
    assert capsys.readouterr().out.startswith("u ")
    magic.smolvm_line("stop --name u")
    assert capsys.readouterr().out == "microVM stopped; the next %%smolvm cell starts a fresh one\n"
    assert sb.calls == ["reset", "stop"]


def test_a_refused_setting_is_on_record(magic, capsys):
    magic.smolvm_line("config --name r")
    assert "cell timeout 0 s (0 = none)" in capsys.readouterr().out
    with pytest.raises(SmolVMError, match="limit of 2048 MiB"):
        magic.smolvm_line("config --name r --mem 4096")
    refused = [e for e in magic._sandboxes["r"].audit.read() if e["event"] == "refused"]
    assert len(refused) == 1 and refused[0]["what"] == "memory 4096 MiB"
    assert magic._sandboxes["r"].config.mem_mib != 4096


def test_the_panels_buttons_run_in_the_background(magic, capsys):
    from support import wait_for

    magic.smolvm_line("panel --name p")
    panel = magic._actions["p"].panel
    sb = magic._sandboxes["p"]
    assert "smolvm-state-stopped" in panel.state.value and sb.calls == []
    panel.reset_button.click()
    panel.confirm_button.click()
    assert "resetting: a fresh microVM is starting" in panel.message.value
    assert wait_for(lambda: "smolvm-state-ready" in panel.state.value) and sb.calls == ["reset"]
    panel.mem_mib.value = 1024
    panel.apply_button.click()
    panel.confirm_button.click()
    assert "restarting the VM with memory 1024 MiB; its previous state is gone" in panel.message.value
    assert wait_for(lambda: sb.calls == ["reset", "reset"]) and sb.config.mem_mib == 1024
    panel.teardown_button.click()
    panel.confirm_button.click()
    assert "the VM is being destroyed; the next %%smolvm cell starts a fresh one" in panel.message.value
    assert wait_for(lambda: "smolvm-state-stopped" in panel.state.value) and sb.calls[-1] == "stop"
    magic.smolvm_line("config --name p --cpus 1")      # the same actions as the panel's
    assert capsys.readouterr().out.endswith("saved vCPUs 1; the VM is stopped and starts with them next time\n")
    assert panel.vcpus.value == 1                       # the panel shows the line's change


def test_status_says_when_the_figures_cannot_be_read(magic, capsys):
    magic.smolvm_line("config --name s")
    capsys.readouterr()
    sb = magic._sandboxes["s"]

    def broken():
        raise SmolVMError("the guest agent did not answer")
    sb.stats = broken
    magic.smolvm_line("status --name s")
    out = capsys.readouterr().out
    assert out.startswith("state      stopped") and "error      the guest agent did not answer" in out
