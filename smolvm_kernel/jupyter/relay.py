"""The relay: messages between the frontend and the guest, apart from sockets and threads.

Frontend -> guest: each verified frontend message keeps its original
header/parent/metadata/content bytes and is re-signed with the guest key
K_guest. Guest -> frontend: every message is size-checked, type-checked,
verified with K_guest, filtered by the output policy, counted against its
cell's output limit and re-signed with K_host. Guest code can read K_guest,
so its signature proves nothing: whatever the guest sends is relayed or
dropped, and nothing it sends raises out of :meth:`Relay.on_guest`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable

from smolvm_guest.wire import Channel
from smolvm_kernel import timeline
from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.jupyter.output_policy import OutputPolicy
from smolvm_kernel.vm.budget import OutputBudget, size_label
from smolvm_kernel.vm.session import DELIM, Session, sign

log = logging.getLogger("smolvm_kernel.jupyter.relay")


@dataclasses.dataclass
class _Request:
    """A frontend request forwarded to the guest and not yet answered."""

    socket: str            # "shell" or "control"
    idents: list[bytes]
    header: dict
    host_busy: bool = False
    allow_stdin: bool = False            # the frontend said it can answer input_request
    output: OutputBudget | None = None   # its IOPub, within max_cell_output
    dropped_told: bool = False           # the cell was told how much of its output was dropped
    sent_at: float | None = None         # when the guest got it (the timeout clock)
    started_at: float | None = None      # when the guest said busy for it (it may queue before)
    interrupted_at: float | None = None  # when the timeout interrupted it


class Relay:
    """The message logic, apart from sockets and threads (unit-testable).

    ``send_frontend(socket_name, frames)`` delivers to the frontend;
    ``sandbox`` is a :class:`~smolvm_kernel.vm.sandbox.Sandbox` (or a fake in tests).
    """

    def __init__(self, session: Session, sandbox, send_frontend: Callable[[str, list[bytes]], None],
                 max_message_bytes: int = 32 * 1024 * 1024,
                 is_ready: Callable[[], bool] = lambda: True, policy: OutputPolicy | None = None,
                 max_cell_output: int = 16 * 2**20) -> None:
        self.session = session
        #: Bytes of IOPub one request may send to the frontend; the rest is dropped and counted.
        #: IOPub from the guest that names no running request (a background
        #: thread, a forged parent) shares one such budget, renewed by each
        #: execute_request: so what the guest can queue for a frontend that
        #: does not read is bounded in bytes, not only by ZeroMQ's message count.
        self.max_cell_output = max_cell_output
        self.background = OutputBudget(max_cell_output)
        self._last_execute: dict = {}
        #: What of the guest's output a frontend may render (see output_policy).
        self.policy = policy or OutputPolicy()
        self._noted: set[tuple[str | None, str]] = set()
        self.sandbox = sandbox
        self.is_ready = is_ready
        self.send_frontend = send_frontend
        self.max_message_bytes = max_message_bytes
        self.inflight: dict[str, _Request] = {}
        self.backlog: list[tuple[Channel, list[bytes], str]] = []
        #: The kernel's own comms (control panel), a HostComms; None until one exists.
        self.host_comms = None
        #: Frontend comms to the guest's "jupyter.widget.control" target: a page
        #: reload restores widgets through them (see _add_host_widgets).
        self.control_comms: set[str] = set()
        self.comm_info_targets: dict[str, str | None] = {}   # comm_info_request id -> target
        self.last_cell_s: float | None = None
        #: The guest kernel's latest execution count: frontends need a real
        #: count in every execute_reply (JupyterLab keeps a cell "[*]" otherwise).
        self.last_count = 0
        self._internal: dict[str, Callable[[int | None], None]] = {}
        #: Called on the loop once a cell's execute_reply has gone to the frontend.
        self.on_cell_end: Callable[[], None] = lambda: None
        self.dropped = 0
        self._dropped_logged = 0
        self._last_drop_log = -1.0

    # -- frontend -> guest

    def forward(self, chan: Channel, socket: str, idents: list[bytes], msg_list: list[bytes],
                header: dict, host_busy: bool = False, allow_stdin: bool = False) -> None:
        """Re-sign the frontend's original frames with K_guest and send them on."""
        if chan in (Channel.SHELL, Channel.CONTROL):
            self.inflight[header["msg_id"]] = _Request(socket, idents, header, host_busy, allow_stdin,
                                                       OutputBudget(self.max_cell_output))
            if header.get("msg_type") == "execute_request":
                self.background, self._last_execute = OutputBudget(self.max_cell_output), header
        if not self.is_ready():
            self.backlog.append((chan, msg_list, header["msg_id"]))
            return
        self._send_guest(chan, msg_list, header["msg_id"])

    def _send_guest(self, chan: Channel, msg_list: list[bytes], msg_id: str = "") -> None:
        req = self.inflight.get(msg_id)
        if req is not None:
            req.sent_at = time.monotonic()
            if req.header.get("msg_type") == "execute_request":
                timeline.mark("first execute_request to the VM")
        body = list(msg_list[1:])   # header, parent, metadata, content, buffers...
        sig = sign(self.sandbox.guest_key, hashlib.sha256, body[:4])
        try:
            self.sandbox.send_raw(chan, [DELIM, sig, *body])
        except SmolVMError as exc:   # the VM went away between the check and the send
            self.fail_inflight(exc)

    def flush_backlog(self) -> None:
        backlog, self.backlog = self.backlog, []
        for chan, msg_list, msg_id in backlog:
            self._send_guest(chan, msg_list, msg_id)

    def overdue(self, limit: float, now: float) -> list[_Request]:
        """Execute requests the guest has been running for longer than ``limit``."""
        return [r for r in self.inflight.values()
                if r.header.get("msg_type") == "execute_request" and r.sent_at is not None
                and now - r.sent_at > limit]

    # -- guest -> frontend

    def on_guest(self, chan: Channel, parts: list[bytes]) -> None:
        """Verify, filter and re-sign one message from the (untrusted) guest.

        Guest code can read K_guest and sign anything, so a valid signature
        proves nothing: every field read here is type-checked, and whatever a
        message holds, it is relayed or dropped; it never raises."""
        try:
            self._on_guest(chan, parts)
        except Exception as exc:     # a bug here must not let the guest stop the host kernel
            self._drop(chan, f"the relay failed on it ({type(exc).__name__}: {exc})")

    def _on_guest(self, chan: Channel, parts: list[bytes]) -> None:
        size = sum(len(p) for p in parts)
        try:
            i = parts.index(DELIM)
        except ValueError:
            return self._drop(chan, "no delimiter")
        if len(parts) < i + 6:
            return self._drop(chan, "too few frames")
        body = parts[i + 2:]
        expected = sign(self.sandbox.guest_key, hashlib.sha256, body[:4])
        if not hmac.compare_digest(expected, parts[i + 1]):
            return self._drop(chan, "bad signature")
        try:
            header = json.loads(body[0])
            parent = json.loads(body[1]) if body[1] else {}
        except (ValueError, RecursionError):
            return self._drop(chan, "malformed header")
        if not isinstance(header, dict) or not isinstance(parent, dict):
            return self._drop(chan, "malformed header")
        msg_type, parent_id = header.get("msg_type"), parent.get("msg_id")
        if not (isinstance(msg_type, str) and isinstance(header.get("msg_id"), str)
                and (parent_id is None or isinstance(parent_id, str))):
            return self._drop(chan, "malformed header")
        content = _json_object(body[3])
        if content is None or not (body[2] == b"{}" or _json_object(body[2]) is not None):
            return self._drop(chan, "metadata or content is not a JSON object")
        if size > self.max_message_bytes:
            self._drop(chan, f"{size} bytes")
            return self._warn(parent, f"[smolvm] a {msg_type} message of {size} bytes from the VM "
                                      f"was dropped: the limit is {self.max_message_bytes} bytes\n")
        if self.host_comms is not None and msg_type != "stream" and (
                self.host_comms.mentioned_in(body[3]) or self.host_comms.mentioned_in(body[2])):
            # The guest may not drive, redisplay or restate the host's panel.
            return self._drop(chan, "names a host-owned comm")
        if parent_id in self._internal:
            # The host's own request (see run_internal): never shown.
            if chan == Channel.SHELL:
                count = content.get("execution_count")
                self._count(count)
                self._internal.pop(parent_id)(count if isinstance(count, int) else None)
            return
        if msg_type in _POLICY_TYPES and not self.policy.trusted:
            body = self._apply_policy(msg_type, body, parent, content)
            if body is None:
                return self._drop(chan, f"{msg_type} refused by the output policy")
        if self.host_comms is not None and msg_type in ("comm_info_reply", "comm_msg"):
            body = self._add_host_widgets(msg_type, body, parent_id, content)
        if chan == Channel.IOPUB:
            if not (msg_type == "status" and size <= _SMALL_STATUS) and self._over_output_limit(parent_id, body):
                return
            if msg_type == "status":
                req = self.inflight.get(parent_id)
                state = content.get("execution_state")
                if req is not None and state == "busy" and req.started_at is None:
                    req.started_at = time.monotonic()
                if req is not None and req.host_busy and state == "busy":
                    return  # the host already said busy while the VM was booting
                if req is not None and state == "idle":
                    # The agent reads IOPub and shell apart, so "idle" can come
                    # before the reply; a frontend stops listening at "idle".
                    self._tell_dropped(req)
            self._to_frontend("iopub", list(parts[:i]), body)
        elif chan in (Channel.SHELL, Channel.CONTROL):
            req = self.inflight.pop(parent_id, None)
            if req is None:
                return self._drop(chan, "reply to an unknown request")
            self._tell_dropped(req)
            if req.header.get("msg_type") == "execute_request":
                timeline.mark("first execute_reply out")
                start = req.started_at or req.sent_at
                if start is not None:
                    self.last_cell_s = time.monotonic() - start
                self._count(content.get("execution_count"))
            self._to_frontend(req.socket, req.idents, body)
            if req.header.get("msg_type") == "execute_request":
                if timeline.enabled():
                    timeline.finish()
                self.on_cell_end()
        elif chan == Channel.STDIN:
            req = self.inflight.get(parent_id)
            if req is None:
                return self._drop(chan, "input request for an unknown request")
            if msg_type != "input_request" or not req.allow_stdin:
                # The frontend did not offer stdin for this request (nbclient, a
                # widget callback): nobody could answer, or it was not asked.
                return self._drop(chan, f"{msg_type} on stdin for a request without allow_stdin")
            self._to_frontend("stdin", req.idents, body)

    def _tell_dropped(self, req: _Request) -> None:
        """Say once, in the cell, how much of its output was dropped."""
        if req.output is None or not req.output.dropped or req.dropped_told:
            return
        req.dropped_told = True
        self._warn(req.header, f"[smolvm] {size_label(req.output.dropped)} of this cell's output "
                               f"({req.output.dropped_msgs} messages) was dropped: over the "
                               f"{size_label(req.output.limit)} limit\n")

    def _over_output_limit(self, parent_id: str | None, body: list[bytes]) -> bool:
        """Count an IOPub message against its request's budget, or the budget of
        messages that name no running request; True when it must be dropped."""
        req = self.inflight.get(parent_id) if parent_id is not None else None
        budget = req.output if req is not None and req.output is not None else self.background
        if budget.charge(sum(len(p) for p in body)):
            return False
        if budget.just_exhausted:
            limit = size_label(budget.limit)
            if req is not None:
                self._warn(req.header, f"[smolvm] this cell's output reached the {limit} limit "
                                       f"(SandboxConfig.max_output_mib); the rest is dropped\n")
            else:
                self._warn(self._last_execute, f"[smolvm] output from the VM that belongs to no running "
                                               f"cell reached the {limit} limit (SandboxConfig."
                                               f"max_output_mib); the rest is dropped until the next cell runs\n")
        return True

    def _apply_policy(self, msg_type: str, body: list[bytes], parent: dict, content: dict) -> list[bytes] | None:
        """The message with its content (parsed, changed in place) filtered by the
        output policy, or None to drop it. What was blocked is said once per
        request, in the cell."""
        content = self.policy.content(msg_type, content)
        notes, self.policy.notes = self.policy.notes, []
        for note in notes:
            key = (parent.get("msg_id"), note)
            if key not in self._noted:
                if len(self._noted) > 1000:
                    self._noted.clear()
                self._noted.add(key)
                self._warn(parent, note + "\n")
        if content is None:
            return None
        return [*body[:3], json.dumps(content, ensure_ascii=False).encode("utf-8", "backslashreplace"), *body[4:]]

    def _count(self, count) -> None:
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            self.last_count = count

    def next_count(self) -> int:
        """A count for a reply the guest cannot number (its VM is gone)."""
        self.last_count += 1
        return self.last_count

    def run_internal(self, code: str, done: Callable[[int | None], None]) -> None:
        """Run ``code`` in the guest for the host, outputs unseen; ``done(count)`` gets
        the execution count. Used to number %smolvm lines in the guest's history."""
        session = Session(key=self.sandbox.guest_key, username="smolvm-host")
        msg = session.msg("execute_request", content={
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": False})
        self._internal[msg["header"]["msg_id"]] = done
        try:
            self.sandbox.send_raw(Channel.SHELL, session.serialize(msg))
        except SmolVMError:
            self._internal.pop(msg["header"]["msg_id"])(None)

    def _add_host_widgets(self, msg_type: str, body: list[bytes], parent_id, content: dict) -> list[bytes]:
        """Let a reloaded page find the host's widgets (the panel) next to the guest's:
        list them in comm_info_reply, and add their states to the control comm's
        update_states. The guest's own entries are kept as they are."""
        if msg_type == "comm_msg" and not self.control_comms:
            return body
        if msg_type == "comm_info_reply" and isinstance(content.get("comms"), dict):
            if self.comm_info_targets.pop(parent_id, None) not in (None, "", "jupyter.widget"):
                return body
            for comm_id in self.host_comms.manager.comms:
                content["comms"][comm_id] = {"target_name": "jupyter.widget"}
        elif msg_type == "comm_msg" and isinstance(content.get("comm_id"), str) \
                and content["comm_id"] in self.control_comms:
            data = content.get("data")
            if not (isinstance(data, dict) and data.get("method") == "update_states"
                    and isinstance(data.get("states"), dict)):
                return body
            data["states"].update(self.host_comms.widget_states())
        else:
            return body
        return [*body[:3], json.dumps(content).encode(), *body[4:]]

    def running_cells(self) -> int:
        """Execute requests forwarded to the guest and not yet answered."""
        # list(): the ops thread reads this while the loop changes it.
        return sum(1 for r in list(self.inflight.values()) if r.header.get("msg_type") == "execute_request")

    def _to_frontend(self, socket: str, prefix: list[bytes], body: list[bytes]) -> None:
        sig = self.session.sign(body[:4])
        self.send_frontend(socket, [*prefix, DELIM, sig, *body])

    def _drop(self, chan: Channel, why: str) -> None:
        """Count a dropped guest message; log at most one line a second (a guest
        can send hundreds of thousands a second), with how many were dropped."""
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:
            since = self.dropped - self._dropped_logged
            log.warning("dropped a %s message from the guest: %s%s", chan.name, why,
                        f" ({since - 1} more dropped since the last warning)" if since > 1 else "")
            self._last_drop_log, self._dropped_logged = now, self.dropped

    def notice(self, text: str) -> None:
        """A host note for every running cell (stderr), e.g. a limit the guest reached."""
        for req in list(self.inflight.values()):
            if req.header.get("msg_type") == "execute_request":
                self._warn(req.header, text)

    def _warn(self, parent: dict, text: str) -> None:
        self.publish("stream", {"name": "stderr", "text": text}, parent)

    # -- host-originated messages

    def publish(self, msg_type: str, content: dict, parent: dict | None,
                metadata: dict | None = None, buffers: list | None = None) -> None:
        msg = self.session.msg(msg_type, content=content, parent=parent or {}, metadata=metadata)
        frames = self.session.serialize(msg, ident=f"kernel.smolvm.{msg_type}".encode())
        self.send_frontend("iopub", frames + [bytes(b) for b in buffers or ()])

    def reply(self, socket: str, idents: list[bytes], msg_type: str, content: dict, parent: dict) -> None:
        msg = self.session.msg(msg_type, content=content, parent=parent)
        self.send_frontend(socket, self.session.serialize(msg, ident=idents))

    def fail_inflight(self, error: SmolVMError) -> None:
        """The VM died: end every open request with a clear error, then idle."""
        inflight, self.inflight = self.inflight, {}
        internal, self._internal = self._internal, {}
        self.comm_info_targets.clear()
        self.backlog.clear()
        for done in internal.values():
            done(None)
        text = str(error)
        for req in inflight.values():
            mtype = req.header.get("msg_type", "")
            reply_type = mtype.replace("_request", "_reply")
            err = {"ename": type(error).__name__, "evalue": text.splitlines()[0],
                   "traceback": [f"\x1b[0;31m{type(error).__name__}\x1b[0m: {text}"]}
            if mtype == "execute_request":
                self.publish("error", err, req.header)
            count = self.next_count() if mtype == "execute_request" else None
            self.reply(req.socket, req.idents, reply_type,
                       {"status": "error", "execution_count": count, **err}, req.header)
            self.publish("status", {"execution_state": "idle"}, req.header)


#: Guest messages whose content the output policy reads (see output_policy).
_POLICY_TYPES = frozenset({"display_data", "execute_result", "update_display_data", "execute_reply",
                           "input_request", "comm_open", "comm_msg"})


#: A guest status message up to this size is never counted or dropped (a
#: frontend would show a cell busy for ever without its "idle"); ipykernel's
#: are about 500 bytes.
_SMALL_STATUS = 4096


def _json_object(data: bytes) -> dict | None:
    """``data`` parsed, if it is one JSON object (guest bytes: anything else is None)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None
