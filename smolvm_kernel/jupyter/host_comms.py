"""Comms that live in the kernel process itself (the control panel's widgets).

The SmolVM kernel is not an ipykernel, so ipywidgets has no comm
implementation here until :class:`HostComms` installs one through the
``comm`` package's documented hooks (``comm.create_comm`` and
``comm.get_comm_manager``). Every host comm id starts with
:data:`HOST_COMM_PREFIX`, so the relay can tell cheaply whether a message
from the guest mentions one: a byte search first, and the decoded JSON
whenever the bytes hold an escape that could spell the prefix.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable

import comm
from comm.base_comm import BaseComm, CommManager

log = logging.getLogger("smolvm_kernel.jupyter.host_comms")
HOST_COMM_PREFIX = "smolvmhost"
_HOST_ID = re.compile(r"smolvmhost[0-9a-f]{32}")


class HostComm(BaseComm):
    def __init__(self, owner: HostComms, **kwargs) -> None:
        self._owner = owner
        super().__init__(**kwargs)

    def close(self, data=None, metadata=None, buffers=None, deleting: bool = False) -> None:
        # BaseComm.close unregisters from the global manager; ours is per owner.
        if self._closed:
            return
        self._closed = True
        self.publish_msg("comm_close", data=data or self._close_data, metadata=metadata, buffers=buffers)
        self._owner.manager.comms.pop(self.comm_id, None)

    def publish_msg(self, msg_type: str, data=None, metadata=None, buffers=None, **keys) -> None:
        content = {"data": data or {}, "comm_id": self.comm_id, **keys}
        try:
            self._owner.publish(msg_type, content, metadata or {}, list(buffers or []))
        except Exception as exc:   # e.g. a widget's __del__ after the sockets closed
            log.debug("comm %s: %s not sent: %s", self.comm_id, msg_type, exc)


class HostComms:
    """The kernel's comm manager; ``publish(msg_type, content, metadata, buffers)`` sends on IOPub."""

    def __init__(self, publish: Callable[[str, dict, dict, list], None]) -> None:
        self.publish = publish
        self.manager = CommManager()
        comm.create_comm = self.create
        comm.get_comm_manager = lambda: self.manager

    def create(self, *args, **kwargs) -> HostComm:
        if not kwargs.get("comm_id"):
            kwargs["comm_id"] = HOST_COMM_PREFIX + uuid.uuid4().hex
        return HostComm(self, *args, **kwargs)

    def owns(self, comm_id) -> bool:
        return isinstance(comm_id, str) and comm_id in self.manager.comms

    def mentioned_in(self, data: bytes) -> bool:
        """Whether ``data`` (guest bytes, a JSON document) names any comm of ours.

        Decided on the decoded text: ``"\\u0073molvmhost..."`` names the same
        comm as ``"smolvmhost..."`` once a frontend parses it."""
        if not self.manager.comms:
            return False
        if b"\\u" in data:
            try:
                text = _decoded_strings(json.loads(data))
            except (ValueError, RecursionError):
                text = data.decode("utf-8", "replace")   # not JSON: no frontend reads it either
        elif HOST_COMM_PREFIX.encode() in data:
            text = data.decode("utf-8", "replace")
        else:
            return False
        return any(m in self.manager.comms for m in _HOST_ID.findall(text))

    def widget_states(self) -> dict:
        """The host's widgets as ipywidgets' control comm reports them (no binary buffers)."""
        from ipywidgets.widgets.widget import _instances

        out = {}
        for model_id, widget in list(_instances.items()):
            if model_id in self.manager.comms:
                out[model_id] = {"model_name": widget._model_name, "model_module": widget._model_module,
                                 "model_module_version": widget._model_module_version,
                                 "state": widget.get_state(drop_defaults=False)}
        return out

    def handle(self, msg: dict) -> None:
        """A comm_msg / comm_close from the frontend for one of our comms."""
        content = msg.get("content") or {}
        target = self.manager.comms.get(content.get("comm_id"))
        if target is None:
            return
        try:
            if msg["header"]["msg_type"] == "comm_close":
                target.handle_close(msg)
                self.manager.comms.pop(target.comm_id, None)
            else:
                target.handle_msg(msg)
        except Exception:  # a widget callback's bug must not kill the kernel
            log.exception("host comm %s failed on %s", target.comm_id, msg["header"]["msg_type"])


def _decoded_strings(obj, depth: int = 0) -> str:
    """Every string (keys included) in a parsed JSON value, joined by newlines."""
    if isinstance(obj, str):
        return obj
    if depth > 64:
        return ""
    if isinstance(obj, dict):
        return "\n".join(f"{k}\n{_decoded_strings(v, depth + 1)}" for k, v in obj.items())
    if isinstance(obj, list):
        return "\n".join(_decoded_strings(v, depth + 1) for v in obj)
    return ""
