"""The control panel as the SmolVM kernel shows it, from the kernel process itself.

The panel's widgets live in the kernel process and talk to the frontend
through comms of the host's own (host_comms.py), never through the guest.
:class:`PanelHost` makes the panel on first use, publishes its messages in
reply to the request at hand (the ``%smolvm panel`` line, or the click being
handled), and keeps it fresh: the VM's state as the kernel's loop knows it
at once, the guest's figures read every REFRESH_SECONDS off the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from smolvm_kernel.jupyter.panel import REFRESH_SECONDS

#: Figures of a running guest, left out while no guest runs.
_GUEST_FIGURES = ("mem_total_kib", "mem_available_kib", "cpu_percent", "disk_total_bytes", "disk_used_bytes",
                  "vcpus", "vm_uptime_s")


class PanelHost:
    """The kernel's control panel over ``actions`` (an actions.VMActions).

    ``publish(msg_type, content, parent, metadata=, buffers=)`` sends on
    IOPub; ``install_comms(comms)`` hands the host's comms to the relay (which
    keeps the guest from speaking for them); ``state()`` and ``last_cell_s()``
    are what the loop knows; ``off_loop(fn)`` runs ``fn`` on the thread for
    work that waits on the VM, and ``call_soon(fn, *args)`` brings a result
    back to the loop. Every method runs on the kernel's loop.
    """

    def __init__(self, actions, *, publish: Callable, install_comms: Callable, state: Callable[[], str],
                 last_cell_s: Callable[[], float | None], off_loop: Callable[[Callable[[], None]], None],
                 call_soon: Callable[..., None]) -> None:
        self.actions = actions
        #: The request the panel's messages answer: the last %smolvm line or click.
        self.parent: dict = {}
        self._publish = publish
        self._install_comms = install_comms
        self._state = state
        self._last_cell_s = last_cell_s
        self._off_loop = off_loop
        self._call_soon = call_soon
        self._comms = None
        self._stats_running = False
        self._last_stats = 0.0

    @property
    def panel(self):
        return self.actions.panel

    def show(self) -> None:
        """Display the control panel (made on first use) in the current cell."""
        if self.panel is None:
            from smolvm_kernel.jupyter.host_comms import HostComms
            from smolvm_kernel.jupyter.panel import ControlPanel

            if self._comms is None:
                self._comms = HostComms(self._publish_comm)
                self._install_comms(self._comms)
            self.actions.panel = ControlPanel(self.actions)
            self.refresh()
            self.fetch_stats()
        bundle = self.panel.widget._repr_mimebundle_()
        self._publish("display_data", {"data": bundle, "metadata": {}, "transient": {}}, self.parent)

    def handle(self, msg: dict) -> None:
        """A comm_msg / comm_close from the frontend for one of the host's comms (a click)."""
        self.parent = msg["header"]
        self._comms.handle(msg)

    def tick(self, now: float) -> None:
        """Called by the kernel's loop every poll: the figures, every REFRESH_SECONDS."""
        if self.panel is not None and now - self._last_stats >= REFRESH_SECONDS:
            self.fetch_stats()

    def fetch_stats(self) -> None:
        """Read the figures off the loop (they may wait on the guest), then show them."""
        if self.panel is None:
            return
        self._last_stats = time.monotonic()
        if self._stats_running:
            return
        self._stats_running = True
        self._off_loop(lambda: self._call_soon(self._stats_done, self.actions.panel_status()))

    def refresh(self, stats: dict | None = None) -> None:
        """Show ``stats`` (or the last figures) with the state as the loop knows it now."""
        if self.panel is None:
            return
        merged = {**self.panel.last_status, **(stats or {})}
        merged["state"] = self._state()    # what the loop knows now wins
        merged["last_cell_s"] = self._last_cell_s()
        if merged["state"] in ("stopped", "stopping", "dead", "booting"):
            for key in _GUEST_FIGURES:
                merged.pop(key, None)
        self.panel.refresh(merged)

    def _stats_done(self, stats: dict) -> None:
        self._stats_running = False
        self.refresh(stats)

    def _publish_comm(self, msg_type: str, content: dict, metadata: dict, buffers: list) -> None:
        self._publish(msg_type, content, self.parent, metadata=metadata, buffers=buffers)
