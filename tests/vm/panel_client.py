"""A frontend's view of widgets, from IOPub: enough to drive the control panel
over the Jupyter protocol exactly as a browser does (comm messages)."""

from __future__ import annotations

import queue
import time


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
            except queue.Empty:
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
