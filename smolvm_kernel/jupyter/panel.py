"""The control panel: an ipywidgets view of one microVM, owned by the host.

The panel never talks to the VM itself. It drives a :class:`PanelActions`
object (the SmolVM kernel's for ``%smolvm panel`` and the IPython magic's for
``%smolvm panel --name N`` are each an :class:`~smolvm_kernel.jupyter.actions.VMActions`),
and it shows what ``refresh(status)`` hands it. Every figure that came out of the guest
is coerced to a number before it is rendered: the VM is not trusted to write
HTML into the host's panel.
"""

from __future__ import annotations

import html
import math
from typing import Protocol

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.jupyter.actions import describe, needs_restart

REFRESH_SECONDS = 2.0
STATE_COLORS = {"booting": "#b58900", "ready": "#2e7d32", "busy": "#1565c0",
                "stopped": "#616161", "stopping": "#616161", "dead": "#c62828"}


class PanelActions(Protocol):
    """What the panel needs from whoever owns the Sandbox."""

    name: str

    def settings(self) -> dict:
        """Current values of vcpus, mem_mib, disk_mib, exec_timeout, network."""

    def limits(self) -> dict:
        """The host's limits: max_vcpus, max_mem_mib, max_disk_mib."""

    def check(self, changes: dict) -> None:
        """Raise ConfigError (naming value and fix) if ``changes`` cannot be applied."""

    def apply(self, changes: dict) -> str:
        """Apply validated changes (restarting the VM if needed); a message for the user."""

    def reset(self) -> str:
        """Replace the VM with a fresh one, same settings."""

    def teardown(self) -> str:
        """Destroy the VM."""

    def checkpoint_button(self, action: str, name: str | None, done) -> None:
        """checkpoint / restore / delete / undo (vm/checkpoints.py); ``done(text,
        error)`` gets the outcome once the VM is done with it."""


class ControlPanel:
    """The widget tree and its behaviour; ``widget`` is what gets displayed."""

    def __init__(self, actions: PanelActions) -> None:
        import ipywidgets as w

        self.actions = actions
        self._pending: tuple[str, dict] | None = None   # (action, changes) awaiting confirmation
        self.last_status: dict = {}
        limits = actions.limits()

        self.title = w.HTML(f"<b>SmolVM</b> &nbsp;{html.escape(actions.name)}")
        self.state = w.HTML()
        self.state.add_class("smolvm-state")
        self.details = w.HTML()
        self.details.add_class("smolvm-details")

        style = {"description_width": "9em"}
        layout = w.Layout(width="18em")
        self.vcpus = w.IntText(description="vCPUs", style=style, layout=layout,
                               tooltip=f"1 to {limits['max_vcpus']}")
        self.mem_mib = w.IntText(description="memory (MiB)", style=style, layout=layout,
                                 tooltip=f"at most {limits['max_mem_mib']}")
        self.disk_mib = w.IntText(description="disk (MiB)", style=style, layout=layout,
                                  tooltip=f"at most {limits['max_disk_mib']}")
        self.exec_timeout = w.FloatText(description="cell timeout (s)", style=style, layout=layout,
                                        tooltip="0 = no limit; applied without a restart")
        self.network = w.Checkbox(description="network", indent=False)
        self.apply_button = w.Button(description="Apply", icon="check", tooltip="apply the settings above")
        self.reset_button = w.Button(description="Reset", icon="refresh",
                                     tooltip="a fresh VM with the same settings")
        self.teardown_button = w.Button(description="Teardown", icon="power-off", button_style="danger",
                                        tooltip="destroy the VM")
        for button, action in ((self.apply_button, "apply"), (self.reset_button, "reset"),
                               (self.teardown_button, "teardown")):
            button.add_class(f"smolvm-{action}")
            button.on_click(lambda _b, a=action: self.request(a))

        self.confirm_text = w.HTML()
        self.confirm_text.add_class("smolvm-confirm-text")
        self.confirm_button = w.Button(description="Confirm", button_style="warning")
        self.confirm_button.add_class("smolvm-confirm")
        self.cancel_button = w.Button(description="Cancel")
        self.cancel_button.add_class("smolvm-cancel")
        self.confirm_button.on_click(lambda _b: self.confirm())
        self.cancel_button.on_click(lambda _b: self.cancel())
        self.confirm_box = w.VBox([self.confirm_text, w.HBox([self.confirm_button, self.cancel_button])],
                                  layout=w.Layout(display="none"))
        self.message = w.HTML()
        self.message.add_class("smolvm-message")

        # Checkpoints: the user's (host-side names, checked: checkpoints.NAME_RE).
        self.checkpoint_list = w.Dropdown(options=[], description="checkpoints", style=style,
                                          layout=w.Layout(width="26em"))
        self.checkpoint_list.add_class("smolvm-checkpoint-list")
        self.checkpoint_buttons = {}
        for action, label, icon, tip in (
                ("checkpoint", "Checkpoint", "camera", "save the VM's whole state now"),
                ("restore", "Restore", "history", "replace the VM's state with the chosen checkpoint's"),
                ("delete", "Delete", "trash", "delete the chosen checkpoint"),
                ("undo", "Undo", "undo", "back to the state before the last cell (%smolvm config --undo N)")):
            button = w.Button(description=label, icon=icon, tooltip=tip)
            button.add_class(f"smolvm-{action}")
            button.on_click(lambda _b, a=action: self.request(a))
            self.checkpoint_buttons[action] = button

        settings = w.VBox([self.vcpus, self.mem_mib, self.disk_mib, self.exec_timeout, self.network])
        buttons = w.HBox([self.apply_button, self.reset_button, self.teardown_button])
        checkpoints = w.VBox([self.checkpoint_list, w.HBox(list(self.checkpoint_buttons.values()))])
        self.widget = w.VBox([w.HBox([self.title, self.state]), self.details, settings, buttons,
                              checkpoints, self.confirm_box, self.message],
                             layout=w.Layout(border="1px solid #ccc", padding="6px", width="max-content"))
        self.widget.add_class("smolvm-panel")
        self.load_settings()

    # -- settings

    def load_settings(self) -> None:
        s = self.actions.settings()
        self.vcpus.value = int(s["vcpus"])
        self.mem_mib.value = int(s["mem_mib"])
        self.disk_mib.value = int(s["disk_mib"])
        self.exec_timeout.value = float(s["exec_timeout"])
        self.network.value = s["network"] != "none"

    def changes(self) -> dict:
        """The settings the user edited, as SandboxConfig values."""
        current = self.actions.settings()
        wanted = {"vcpus": self.vcpus.value, "mem_mib": self.mem_mib.value,
                  "disk_mib": self.disk_mib.value, "exec_timeout": self.exec_timeout.value,
                  "network": "nat" if self.network.value else "none"}
        if (current["network"] != "none") == self.network.value:
            wanted["network"] = current["network"]
        return {k: v for k, v in wanted.items() if v != current[k]}

    # -- actions, each behind a confirmation when it destroys the VM's state

    def request(self, action: str) -> None:
        self.cancel()
        changes: dict = {}
        if action == "apply":
            changes = self.changes()
            if not changes:
                return self.say("nothing to apply: the settings are unchanged")
            try:
                self.actions.check(changes)
            except SmolVMError as exc:
                return self.say(str(exc), error=True)
            restart = getattr(self.actions, "needs_restart", needs_restart)
            if not restart(changes):
                return self._run("apply", changes)
            text = (f"Apply restarts the VM with {describe(changes)}. Everything in it "
                    f"(variables, files, a running cell) is lost.")
        elif action == "reset":
            text = "Reset replaces the VM with a fresh one. Everything in it is lost."
        elif action == "teardown":
            text = "Teardown destroys the VM. Everything in it is lost."
        elif action == "checkpoint":
            return self._run(action, {})
        elif action in ("restore", "delete"):
            name = self.checkpoint_list.value
            if not name:
                return self.say("no checkpoint chosen: take one with Checkpoint, or %smolvm checkpoint NAME")
            changes = {"name": name}
            text = (f"Restore replaces the VM's state with checkpoint '{name}'. What the VM holds now is lost "
                    f"unless you took a checkpoint of it." if action == "restore" else
                    f"Delete removes checkpoint '{name}' from disk: the state it holds is lost.")
        elif action == "undo":
            text = "Undo brings the VM back to its state before the last cell. What that cell did is lost."
        else:
            raise ValueError(action)
        self._pending = (action, changes)
        self.confirm_text.value = f"<span style='color:#b58900'>{html.escape(text, quote=False)}</span>"
        self.confirm_box.layout.display = "flex"

    def confirm(self) -> None:
        if self._pending is None:
            return
        action, changes = self._pending
        self.cancel()
        self._run(action, changes)

    def cancel(self) -> None:
        self._pending = None
        self.confirm_box.layout.display = "none"
        self.confirm_text.value = ""

    def _run(self, action: str, changes: dict) -> None:
        if action in self.checkpoint_buttons:
            self.say(f"{action}: working…")
            self.actions.checkpoint_button(action, changes.get("name"), lambda text, error: self.say(text, error))
            return
        try:
            if action == "apply":
                text = self.actions.apply(changes)
                self.load_settings()
            else:
                text = getattr(self.actions, action)()
        except SmolVMError as exc:
            return self.say(str(exc), error=True)
        self.say(text)

    def say(self, text: str, error: bool = False) -> None:
        color = "#c62828" if error else "#2e7d32"
        self.message.value = f"<span style='color:{color}'>{html.escape(text, quote=False)}</span>"

    # -- live status

    def refresh(self, status: dict) -> None:
        """Show ``status`` (Sandbox.stats() plus the owner's state and last cell time)."""
        self.last_status = status
        state = status.get("state") if status.get("state") in STATE_COLORS else "dead"
        self.state.value = (f"<span class='smolvm-state-{state}' style='color:#fff;"
                            f"background:{STATE_COLORS[state]};padding:1px 8px;border-radius:8px'>"
                            f"{state}</span>")
        self.details.value = render_details(status)
        listed = status.get("checkpoints")
        if isinstance(listed, list):
            options = [(str(label), str(name)) for name, label in listed]
            if options != list(self.checkpoint_list.options):
                chosen = self.checkpoint_list.value
                self.checkpoint_list.options = options
                if chosen in [name for _, name in options]:
                    self.checkpoint_list.value = chosen


def render_details(s: dict) -> str:
    """The status table; numbers only from the guest, strings only from the host."""
    total = _num(s.get("mem_total_kib"))
    avail = _num(s.get("mem_available_kib"))
    disk_total = _num(s.get("disk_total_bytes"))
    disk_used = _num(s.get("disk_used_bytes"))
    uptime = _num(s.get("vm_uptime_s"))
    rows = [
        ("backend", f"{_text(s.get('backend'))} / {_text(s.get('accel'))}"
                    f" &nbsp; transport {_text(s.get('transport'))}"),
        ("network", "on" if s.get("network") not in (None, "none") else "off"),
        ("uptime", _duration(uptime) if uptime is not None else "-"),
        ("vCPUs", _int(s.get("vcpus")) if "vcpus" in s else f"{_int(s.get('configured_vcpus'))} (configured)"),
        ("memory", f"{(total - avail) / 1024:.0f} MiB used of {total / 1024:.0f} MiB"
                   if total is not None and avail is not None else
                   f"{_int(s.get('configured_mem_mib'))} MiB (configured)"),
        ("CPU", f"{_num(s.get('cpu_percent')):.0f} %" if _num(s.get("cpu_percent")) is not None else "-"),
        ("scratch disk", f"{disk_used / 2**20:.0f} MiB used of {disk_total / 2**20:.0f} MiB"
                         if disk_total is not None and disk_used is not None else "-"),
        ("last cell", f"{_num(s.get('last_cell_s')):.2f} s" if _num(s.get("last_cell_s")) is not None else "-"),
    ]
    body = "".join(f"<tr><td style='padding-right:1em;color:#666'>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<table style='font-size:90%'>{body}</table>"


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value) -> str:
    n = _num(value)
    return str(int(n)) if n is not None else "-"


def _text(value) -> str:
    return html.escape(str(value)) if value is not None else "-"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
