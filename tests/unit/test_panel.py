"""The control panel's widget model, driven like a user would: edit, click, confirm."""

from __future__ import annotations

import pytest

from smolvm_kernel.config import USER_SETTINGS, SandboxConfig
from smolvm_kernel.jupyter.panel import ControlPanel, render_details


class FakeActions:
    name = "test-vm"

    def __init__(self) -> None:
        self.config = SandboxConfig(vcpus=1, mem_mib=512, disk_mib=2048, max_mem_mib=4096, max_vcpus=2)
        self.calls: list[tuple] = []

    def settings(self) -> dict:
        return {k: getattr(self.config, k) for k in USER_SETTINGS}

    def limits(self) -> dict:
        return {k: getattr(self.config, k) for k in ("max_vcpus", "max_mem_mib", "max_disk_mib")}

    def check(self, changes: dict) -> None:
        self.config.changed(**changes)

    def apply(self, changes: dict) -> str:
        self.calls.append(("apply", changes))
        self.config = self.config.changed(**changes)
        return "applied"

    def reset(self) -> str:
        self.calls.append(("reset",))
        return "resetting"

    def teardown(self) -> str:
        self.calls.append(("teardown",))
        return "torn down"

    def checkpoint_button(self, action, name, done) -> None:
        self.calls.append((action, name))
        done(f"{action} done", False)


@pytest.fixture
def panel():
    actions = FakeActions()
    return ControlPanel(actions), actions


def confirm_shown(p: ControlPanel) -> bool:
    return p.confirm_box.layout.display != "none"


def test_panel_shows_the_current_settings(panel):
    p, _ = panel
    assert (p.vcpus.value, p.mem_mib.value, p.disk_mib.value, p.exec_timeout.value) == (1, 512, 2048, 0.0)
    assert p.network.value is False


def test_apply_asks_first_then_restarts_with_the_new_memory(panel):
    p, actions = panel
    p.mem_mib.value = 1024
    p.apply_button.click()
    assert actions.calls == [] and confirm_shown(p)
    assert "lost" in p.confirm_text.value and "memory 1024 MiB" in p.confirm_text.value
    p.confirm_button.click()
    assert actions.calls == [("apply", {"mem_mib": 1024})]
    assert not confirm_shown(p) and "applied" in p.message.value
    assert p.mem_mib.value == 1024


def test_a_timeout_alone_applies_without_a_restart_or_confirmation(panel):
    p, actions = panel
    p.exec_timeout.value = 30.0
    p.apply_button.click()
    assert actions.calls == [("apply", {"exec_timeout": 30.0})] and not confirm_shown(p)


@pytest.mark.parametrize("field,value,words", [
    ("mem_mib", 8192, "above this host's limit of 4096 MiB"),
    ("vcpus", 3, "above this host's limit of 2"),
    ("vcpus", 0, "out of range"),
    ("mem_mib", 64, "out of range"),
    ("exec_timeout", -1.0, "too small"),
])
def test_values_outside_the_limits_are_refused_in_the_panel(panel, field, value, words):
    p, actions = panel
    getattr(p, field).value = value
    p.apply_button.click()          # no exception reaches the widget machinery
    assert actions.calls == [] and not confirm_shown(p)
    assert words in p.message.value and "#c62828" in p.message.value


def test_network_toggle_asks_to_restart_with_nat(panel):
    p, actions = panel
    p.network.value = True
    p.apply_button.click()
    assert "network nat" in p.confirm_text.value
    p.confirm_button.click()
    assert actions.calls == [("apply", {"network": "nat"})]


def test_network_refusal_from_the_host_shows_in_the_panel(panel):
    from smolvm_kernel.host.net import NetworkError

    p, actions = panel

    def refuse(changes):
        raise NetworkError("network='nat' needs CAP_NET_ADMIN")
    actions.check = refuse
    p.network.value = True
    p.apply_button.click()
    assert actions.calls == [] and "needs CAP_NET_ADMIN" in p.message.value


def test_apply_with_nothing_changed_says_so(panel):
    p, actions = panel
    p.apply_button.click()
    assert actions.calls == [] and "nothing to apply" in p.message.value


@pytest.mark.parametrize("button,call", [("reset_button", "reset"), ("teardown_button", "teardown")])
def test_reset_and_teardown_need_confirmation(panel, button, call):
    p, actions = panel
    getattr(p, button).click()
    assert actions.calls == [] and confirm_shown(p)
    p.cancel_button.click()
    assert actions.calls == [] and not confirm_shown(p)
    getattr(p, button).click()
    p.confirm_button.click()
    assert actions.calls == [(call,)]
    p.confirm_button.click()        # a second click confirms nothing
    assert actions.calls == [(call,)]


def test_state_and_figures_follow_the_status(panel):
    p, _ = panel
    p.refresh({"state": "ready", "backend": "qemu", "accel": "tcg", "transport": "virtio-serial",
               "network": "none", "vcpus": 2, "mem_total_kib": 512 * 1024, "mem_available_kib": 400 * 1024,
               "cpu_percent": 12.5, "disk_total_bytes": 2048 * 2**20, "disk_used_bytes": 3 * 2**20,
               "vm_uptime_s": 75.0, "last_cell_s": 0.25})
    assert "smolvm-state-ready" in p.state.value
    for text in ("qemu / tcg", "112 MiB used of 512 MiB", "12 %", "3 MiB used of 2048 MiB", "1:15", "0.25 s",
                 "off"):
        assert text in p.details.value, text
    p.refresh({"state": "stopped", "configured_vcpus": 2, "configured_mem_mib": 512})
    assert "smolvm-state-stopped" in p.state.value and "512 MiB (configured)" in p.details.value


def test_guest_figures_cannot_inject_html():
    html = render_details({"state": "ready", "cpu_percent": "<img src=x onerror=alert(1)>",
                           "vcpus": "<b>", "mem_total_kib": "<script>", "mem_available_kib": 1,
                           "backend": "<i>qemu</i>", "vm_uptime_s": float("nan")})
    assert "<img" not in html and "<script>" not in html and "<b>" not in html and "<i>" not in html
    assert "&lt;i&gt;qemu" in html     # host strings are escaped


def test_unknown_state_shows_as_dead(panel):
    p, _ = panel
    p.refresh({"state": "<evil>"})
    assert "smolvm-state-dead" in p.state.value and "evil" not in p.state.value


def test_actions_decide_what_needs_a_restart(panel):
    # A backend with a balloon shrinks memory live: no confirmation, no restart.
    p, actions = panel
    actions.needs_restart = lambda changes: False
    p.mem_mib.value = 384
    p.apply_button.click()
    assert actions.calls == [("apply", {"mem_mib": 384})] and not confirm_shown(p)


def test_needs_restart_asks_the_sandbox_about_memory():
    from smolvm_kernel.jupyter.actions import needs_restart

    class Box:
        def can_resize_live(self, mib):
            return mib <= 512

    assert not needs_restart({"mem_mib": 384}, Box())
    assert needs_restart({"mem_mib": 768}, Box())
    assert needs_restart({"mem_mib": 384})                  # no running VM to ask
    assert not needs_restart({"exec_timeout": 5.0})
    assert needs_restart({"mem_mib": 384, "vcpus": 1}, Box())


def test_checkpoints_are_listed_taken_at_once_and_restored_or_deleted_after_confirmation(panel):
    p, actions = panel
    p.refresh({"state": "ready", "checkpoints": [("before", "before (2 min ago, 176.3 MiB)"),
                                                  ("first", "first (1 h ago, 170.0 MiB)")]})
    assert p.checkpoint_list.options == (("before (2 min ago, 176.3 MiB)", "before"),
                                         ("first (1 h ago, 170.0 MiB)", "first"))
    p.checkpoint_buttons["checkpoint"].click()          # saving loses nothing: no confirmation
    assert actions.calls == [("checkpoint", None)] and not confirm_shown(p)
    assert "checkpoint done" in p.message.value
    p.checkpoint_list.value = "first"
    for action in ("restore", "delete", "undo"):
        actions.calls.clear()
        p.checkpoint_buttons[action].click()
        assert confirm_shown(p) and actions.calls == []
        assert ("first" in p.confirm_text.value) == (action != "undo")
        p.confirm_button.click()
        assert actions.calls == [(action, "first" if action != "undo" else None)]
    p.refresh({"state": "ready", "checkpoints": []})
    assert p.checkpoint_list.options == () and p.checkpoint_list.value is None
    actions.calls.clear()
    p.checkpoint_buttons["restore"].click()
    assert actions.calls == [] and "no checkpoint chosen" in p.message.value
