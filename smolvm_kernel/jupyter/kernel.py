"""The SmolVM Python kernel: a relaying Jupyter kernel whose cells run in a microVM.

The frontend talks the Jupyter wire protocol to this process (key K_host).
Each message is verified, then its original header/parent/metadata/content
bytes are re-signed with the guest key K_guest and sent down the VM's
channel; messages from the guest are size-checked, verified with K_guest and
re-signed with K_host. msg_ids and parent headers are never rewritten, so
outputs land in the right cell and comms (ipywidgets) keep working.

The host keeps only what must stay on the host: kernel_info, interrupt,
shutdown, ``%smolvm`` lines, and host-owned comms (the control panel), each
a handler in one table (``SmolVMKernel._handlers``) run between one busy and
one idle. The kernel keeps the sockets, the loop and that dispatch; its VM is
the supervisor's (supervisor.py), and what a ``%smolvm`` line or a panel
button does is the actions' (actions.py).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable

import zmq

from smolvm_guest.wire import Channel
from smolvm_kernel import timeline
from smolvm_kernel._version import __version__
from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.jupyter import hostline
from smolvm_kernel.jupyter.actions import VMActions, outcome
from smolvm_kernel.jupyter.backpressure import ByteGate
from smolvm_kernel.jupyter.line_runner import LineRunner, is_line
from smolvm_kernel.jupyter.output_policy import OutputPolicy
from smolvm_kernel.jupyter.panel_host import PanelHost
from smolvm_kernel.jupyter.relay import Relay
from smolvm_kernel.jupyter.supervisor import VMSupervisor
from smolvm_kernel.jupyter.undo import UndoSteps
from smolvm_kernel.vm.session import PROTOCOL_VERSION, Session

log = logging.getLogger("smolvm_kernel.jupyter.kernel")

#: Guest bytes read and not yet relayed, past which the guest channel is not read
#: (with one frame of up to max_message_bytes and one read chunk on top).
GUEST_BACKLOG_BYTES = 32 * 1024 * 1024
#: What a host handler returns when it answers later: it publishes the idle itself.
_LATER = object()


class SmolVMKernel:
    """The kernel process: frontend sockets, one Sandbox, the relay between them.

    One thread owns the sockets and all kernel state (``run``). VM starts and
    stops run in order in the supervisor's worker thread (supervisor.py); host
    work that may wait on the VM (``%smolvm status``, ``push``, ``pull``, the
    panel's figures) runs in another, so the loop never blocks on the guest.
    """

    def __init__(self, connection_info: dict, config: SandboxConfig | None = None,
                 sandbox_factory=None, workdir: str | None = None,
                 listening: dict[str, int] | None = None, config_error: SmolVMError | None = None) -> None:
        from smolvm_kernel.vm.sandbox import Sandbox

        self.info = connection_info
        self.workdir = workdir or os.getcwd()   # the notebook's folder: push/pull stay in it
        config = config or SandboxConfig()
        if not config.workdir:       # the VM's working folder is the notebook's (vm/workdir.py)
            config.workdir = self.workdir
        key = connection_info.get("key", "")
        self.session = Session(key=key.encode() if isinstance(key, str) else key,
                               signature_scheme=connection_info.get("signature_scheme", "hmac-sha256"),
                               username="smolvm-kernel")
        self.ctx = zmq.Context.instance()
        self.sockets: dict[str, zmq.Socket] = {}
        self._bind(listening or {})
        # Guest frames and VM events arrive from other threads through this
        # queue; the pipe wakes the poller. Sockets are touched by one thread.
        self._events: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # The relay is made after the VM's supervisor (it needs the sandbox):
        # the supervisor reaches it through these lambdas.
        self.vm = VMSupervisor(
            sandbox_factory or Sandbox, config, config_error=config_error,
            call_soon=self._call_soon,
            publish=lambda msg_type, content, parent: self.relay.publish(msg_type, content, parent),
            fail_requests=lambda error: self.relay.fail_inflight(error),
            cells_running=lambda: self.relay.running_cells(),
            overdue=lambda limit, now: self.relay.overdue(limit, now),
            on_change=lambda: self.panel_host.refresh(), on_ready=self._vm_ready)
        self.sandbox = self.vm.sandbox
        #: Guest frames posted and not yet relayed, bounded in bytes (backpressure.py).
        self._inflow = ByteGate(GUEST_BACKLOG_BYTES, self.sandbox.pause_reading)
        self.sandbox.on_guest_frame = self._on_guest_frame
        self.sandbox.on_notice = lambda text: self._call_soon(self.relay.notice, text)
        self.relay = Relay(self.session, self.sandbox, self._send_frontend,
                           self.config.max_message_bytes, is_ready=self.vm.guest_ready,
                           policy=OutputPolicy.from_config(self.config),
                           max_cell_output=self.config.max_output_mib * 2**20)
        # A VM with a request in it (a cell, input() waiting) is not idle.
        self.sandbox.busy = lambda: bool(self.relay.inflight or self.relay.backlog)
        self._ops = _SerialThread("smolvm-ops")
        #: Set by a gateway's placement when this kernel was restarted on another host.
        self._placement_notice = os.environ.pop("SMOLVM_NOTICE", "")[:1000]
        #: The %smolvm lines and the panel's buttons (actions.py), over the supervisor.
        #: Undo steps: a checkpoint before each cell with checkpoint_each_cell set (undo.py).
        self.undo = UndoSteps(self.sandbox, lambda: self.sandbox.audit_context.get("kernel_id") or f"p{os.getpid()}",
                              keep=lambda: self.config.checkpoint_each_cell)
        self.actions = VMActions(self.vm, hostline.KERNEL, name=f"this kernel's microVM ({self.config.profile})",
                                 workdir=lambda: self.workdir, show_panel=lambda: self.panel_host.show(),
                                 last_cell=lambda: self.relay.last_count or None, undo=self.undo,
                                 later=self._later,
                                 undone=lambda: self._call_soon(self._step_is_fresh))
        #: The control panel, shown from this process through its own comms (panel_host.py).
        self.panel_host = PanelHost(
            self.actions, publish=self.relay.publish,
            install_comms=lambda comms: setattr(self.relay, "host_comms", comms),
            state=self.vm.state, last_cell_s=lambda: self.relay.last_cell_s,
            off_loop=self._ops.submit, call_soon=self._call_soon)
        #: %smolvm lines in the order sent among the cells, answered as cells (line_runner.py).
        self.lines = LineRunner(self.actions.run_line, self.relay, guest_ready=self.vm.guest_ready,
                                off_loop=self._ops.submit, call_soon=self._call_soon,
                                cells_in_turn=lambda: self.undo.on)
        #: Undo steps are taken as soon as a cell has ended (off the next
        #: cell's path, while the user reads and types); the next cell takes
        #: its own only if anything came in since (see _on_frontend).
        self.relay.on_cell_end = self._step_after_cell
        self._handled = 0                  # frontend messages handled so far
        self._step_fresh_at: int | None = None
        #: The host's own handlers, by socket and message type, as ipykernel's
        #: shell_handlers and control_handlers: each runs between one busy and
        #: one idle (_dispatch). Every other message goes to the guest.
        self._handlers: dict[str, dict[str, Callable]] = {
            "shell": {"kernel_info_request": self._kernel_info, "execute_request": self._host_line,
                      "comm_msg": self._host_comm, "comm_close": self._host_comm},
            "control": {"kernel_info_request": self._kernel_info, "shutdown_request": self._shutdown,
                        "interrupt_request": self._interrupt},
        }
        #: Message types the host takes only when it owns the message: a
        #: %smolvm line, a comm of the host's (the panel); the rest are the guest's.
        self._host_owns: dict[str, Callable[[dict], bool]] = {
            "execute_request": lambda msg: is_line(msg["content"].get("code", "")),
            "comm_msg": self._owns_comm, "comm_close": self._owns_comm,
        }
        self.exiting = False

    @property
    def config(self) -> SandboxConfig:
        """The settings of this kernel's VM (the supervisor's)."""
        return self.vm.config

    @config.setter
    def config(self, value: SandboxConfig) -> None:
        self.vm.config = value

    @property
    def panel(self):
        """The control panel, once ``%smolvm panel`` has shown it."""
        return self.actions.panel

    # -- sockets

    def _bind(self, listening: dict[str, int]) -> None:
        """Bind the five sockets; adopt a listening socket fd that the
        launcher opened for a port (see smolvm_kernel.launch)."""
        transport, ip = self.info.get("transport", "tcp"), self.info.get("ip", "127.0.0.1")
        for name, kind in (("shell", zmq.ROUTER), ("control", zmq.ROUTER), ("stdin", zmq.ROUTER),
                           ("iopub", zmq.XPUB), ("hb", zmq.ROUTER)):
            port = self.info[f"{name}_port"]
            addr = f"{transport}://{ip}" + (f":{port}" if transport == "tcp" else f"-{port}")
            sock = self.ctx.socket(kind)
            sock.linger = 1000
            if kind == zmq.ROUTER:
                sock.router_handover = 1
            if kind == zmq.XPUB:
                # IOPub is an XPUB: a new subscriber gets an iopub_welcome at once,
                # so a client knows IOPub is live without waiting for other traffic
                # (jupyter_client retries kernel_info until some IOPub message arrives).
                sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            if name in listening:
                # libzmq then takes the socket as it is and ignores the address.
                sock.setsockopt(zmq.USE_FD, listening[name])
            sock.bind(addr)
            self.sockets[name] = sock
        threading.Thread(target=self._heartbeat, name="smolvm-hb", daemon=True).start()

    def _heartbeat(self) -> None:
        try:
            zmq.proxy(self.sockets["hb"], self.sockets["hb"])
        except zmq.ZMQError:   # context terminated or sockets closed: exiting
            pass

    def _send_frontend(self, name: str, frames: list[bytes]) -> None:
        self.sockets[name].send_multipart(frames, copy=False)

    # -- the VM's life is the supervisor's (supervisor.py); the loop hears of it here

    def vm_state(self) -> str:
        """booting / ready / busy / stopping / stopped / dead, as the panel shows it."""
        return self.vm.state()

    def _call_soon(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the loop (from any thread): the pipe wakes the poller."""
        self._events.put((fn, args))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _on_guest_frame(self, chan, parts: list[bytes]) -> None:
        """A frame from the guest (the I/O thread): to the loop, counted."""
        size = sum(len(p) for p in parts)
        self._inflow.add(size)
        self._call_soon(self._relay_guest, chan, parts, size)

    def _relay_guest(self, chan, parts: list[bytes], size: int) -> None:
        self.relay.on_guest(chan, parts)
        self._inflow.done(size)

    def _vm_ready(self) -> None:
        """A fresh VM is up (its boot line cleared): the panel's figures, then the waiting requests."""
        self.panel_host.fetch_stats()     # the fresh VM's figures now, not in 2 s
        self.relay.flush_backlog()
        notes, self.sandbox.start_notes = self.sandbox.start_notes, []
        for text in notes:                # the working folder's left-out files, in the first cell
            self.relay.notice(text)

    # -- main loop

    def run(self) -> None:
        self.vm.ensure()
        poller = zmq.Poller()
        for name in ("control", "shell", "stdin", "iopub"):
            poller.register(self.sockets[name], zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        parent = os.getppid()
        while not self.exiting:
            events = dict(poller.poll(250))
            if parent != 1 and os.getppid() != parent:
                # The process that launched this kernel (a Jupyter server,
                # nbclient, a test) died without shutting it down: so does the
                # kernel, with its VM, as ipykernel's parent poller does.
                log.warning("the kernel's launcher (pid %d) is gone; shutting down", parent)
                break
            if self._wake_r in events:
                os.read(self._wake_r, 65536)
            self._drain_events()
            if self.sockets["iopub"] in events:
                self._welcome_subscribers()
            for name in ("control", "shell", "stdin"):
                sock = self.sockets[name]
                if sock in events:
                    for _ in range(32):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frontend(name, frames)
                        self._drain_events()
            now = time.monotonic()
            self.vm.tick(now)
            self.panel_host.tick(now)
        self.vm.shutdown()
        self.undo.clear()       # this kernel's undo steps end with it (named checkpoints stay)

    def _welcome_subscribers(self) -> None:
        sock = self.sockets["iopub"]
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[:1] == b"\x01":
                topic = frame[1:]
                msg = self.session.msg("iopub_welcome", content={"subscription": topic.decode(errors="replace")})
                sock.send_multipart(self.session.serialize(msg, ident=topic or None))

    def _drain_events(self) -> None:
        while True:
            try:
                fn, args = self._events.get_nowait()
            except queue.Empty:
                break
            fn(*args)
        for frames in self.lines.release():
            self._on_frontend("shell", frames, held=True)

    # -- frontend messages

    def _on_frontend(self, name: str, frames: list[bytes], held: bool = False) -> None:
        if name == "shell" and not held and self.lines.hold(frames):
            return      # cells and %smolvm lines run in the order they were sent
        self._handled += 1
        try:
            idents, msg_list = self.session.feed_identities(frames, copy=True)
            msg = self.session.deserialize(msg_list, content=True, copy=True)
        except Exception as exc:
            log.warning("dropped an invalid %s message from the frontend: %s", name, exc)
            return
        header = msg["header"]
        mtype = header.get("msg_type", "")
        if name == "shell":
            self._note(msg)
        handler = self._handlers.get(name, {}).get(mtype)
        if handler is not None and self._host_owns.get(mtype, _always)(msg):
            return self._dispatch(handler, name, idents, msg)
        if name == "shell" and self.vm.torn_down:
            if not mtype.endswith("_request"):
                return   # a widget event for a VM that is gone: nothing to answer, no VM to start
            if self.config.on_stopped == "error":
                return self._dispatch(self._refuse_stopped, name, idents, msg)
        content = msg.get("content")
        fresh = self._step_fresh_at is not None and self._step_fresh_at == self._handled - 1
        if (mtype == "execute_request" and self.undo.on and self.vm.guest_ready() and not fresh
                and isinstance(content, dict) and not content.get("silent")):
            # An undo step first (the VM as the last cell left it); the cell,
            # and what came after it, wait for the save.
            self.relay.publish("status", {"execution_state": "busy"}, header)
            self.lines.pause_for(lambda: self.undo.before_cell(self.relay.last_count or None),
                                 lambda note: self._after_undo_step(idents, msg_list, msg, note))
            return
        if mtype == "execute_request" and fresh:
            self.undo.used()       # the step taken when the last cell ended is this cell's
        self._to_guest(name, idents, msg_list, msg)

    def _to_guest(self, name: str, idents: list[bytes], msg_list: list[bytes], msg: dict,
                  said_busy: bool = False) -> None:
        """A verified request for the guest kernel, to the relay (a VM that is
        not up is started, and the cell shows its boot)."""
        header = msg["header"]
        mtype = header.get("msg_type", "")
        chan = {"shell": Channel.SHELL, "control": Channel.CONTROL, "stdin": Channel.STDIN}[name]
        host_busy = said_busy
        if not self.vm.guest_ready():
            self.vm.ensure()
            if mtype == "execute_request" and not said_busy:
                host_busy = self.vm.show_boot_in(header)
        content = msg.get("content")
        allow_stdin = (mtype == "execute_request" and isinstance(content, dict)
                       and content.get("allow_stdin") is True)
        self.relay.forward(chan, name, idents, msg_list, header, host_busy, allow_stdin)

    def _later(self, work: Callable[[], str], done: Callable[[str, bool], None]) -> None:
        """A panel button's work on the ops thread; its outcome on the loop (actions.VMActions)."""
        self._ops.submit(lambda: self._call_soon(done, *outcome(work)))

    def _step_is_fresh(self) -> None:
        """The VM is an undo step's state now: good for the next request, if it is a cell."""
        self._step_fresh_at = self._handled

    def _step_after_cell(self) -> None:
        """A cell ended: with undo steps on and nothing else running, take the
        next cell's step now. Requests that come meanwhile wait for it."""
        self._step_fresh_at = None
        if (not (self.undo.on and self.vm.guest_ready()) or self.lines.busy or self.relay.running_cells()
                or self.relay.backlog):
            return

        def taken(note: object) -> None:
            if note is None:      # a step: good for the next cell if nothing comes before it
                self._step_is_fresh()
                self._ops.submit(self.undo.prune)
        # No note here: the next cell tries again, and says why if it fails too.
        self.lines.pause_for(lambda: self.undo.before_cell(self.relay.last_count or None, say=False, ahead=True),
                             taken)

    def _after_undo_step(self, idents: list[bytes], msg_list: list[bytes], msg: dict, note: object) -> None:
        if isinstance(note, Exception):
            note = f"[smolvm] no undo step before this cell: {note}\n"
        if note:
            self.relay.publish("stream", {"name": "stderr", "text": note}, msg["header"])
        self._to_guest("shell", idents, msg_list, msg, said_busy=True)
        self._ops.submit(self.undo.prune)      # while the cell runs

    def _dispatch(self, handler: Callable, socket: str, idents: list[bytes], msg: dict) -> None:
        """Run one of the host's handlers between one busy and one idle on
        IOPub, as ipykernel's kernelbase does. A handler that answers later
        returns _LATER and publishes the idle with its reply: a %smolvm line,
        whose reply waits for its count from the guest, or for the VM."""
        header = msg["header"]
        self.relay.publish("status", {"execution_state": "busy"}, header)
        if handler(socket, idents, msg) is not _LATER:
            self.relay.publish("status", {"execution_state": "idle"}, header)

    def _note(self, msg: dict) -> None:
        """What the host learns from a shell request before it is handled."""
        header, content = msg["header"], msg["content"]
        mtype = header.get("msg_type", "")
        if mtype == "comm_info_request":
            self.relay.comm_info_targets[header["msg_id"]] = content.get("target_name")
        elif mtype == "comm_open" and content.get("target_name") == "jupyter.widget.control":
            self.relay.control_comms.add(str(content.get("comm_id")))
        elif mtype == "execute_request":
            timeline.mark("first execute_request in")
            notice, self._placement_notice = self._placement_notice, ""
            if notice:     # once, in the first cell (placement.py: the last host died)
                self.relay.publish("stream", {"name": "stderr", "text": notice}, header)

    def _owns_comm(self, msg: dict) -> bool:
        comms = self.relay.host_comms
        return comms is not None and comms.owns(msg["content"].get("comm_id"))

    # -- the host's handlers (self._handlers), each run by _dispatch

    def _refuse_stopped(self, socket: str, idents: list[bytes], msg: dict) -> None:
        from smolvm_kernel.errors import SandboxStopped

        header = msg["header"]
        error = SandboxStopped("the microVM was torn down; run %smolvm start (or restart the kernel) "
                               "to start a fresh one")
        err = {"ename": "SandboxStopped", "evalue": str(error), "traceback": [str(error)]}
        reply_type = header["msg_type"].replace("_request", "_reply")
        if header["msg_type"] == "execute_request":
            self.relay.publish("error", err, header)
        count = self.relay.next_count() if header["msg_type"] == "execute_request" else None
        self.relay.reply(socket, idents, reply_type, {"status": "error", "execution_count": count, **err},
                         header)

    def _kernel_info(self, socket: str, idents: list[bytes], msg: dict) -> None:
        self.relay.reply(socket, idents, "kernel_info_reply", self.kernel_info(), msg["header"])
        timeline.mark("kernel_info_reply sent")

    def kernel_info(self) -> dict:
        guest = getattr(self.sandbox, "kernel_info", None) or {}
        language_info = guest.get("language_info") or {
            "name": "python", "version": "3", "mimetype": "text/x-python",
            "codemirror_mode": {"name": "ipython", "version": 3}, "pygments_lexer": "ipython3",
            "nbconvert_exporter": "python", "file_extension": ".py"}
        label = self.vm.accel_label()
        return {
            "status": "ok", "protocol_version": PROTOCOL_VERSION,
            "implementation": "smolvm-kernel", "implementation_version": __version__,
            "language_info": language_info,
            "banner": (f"SmolVM Python {__version__}: every cell runs in a microVM ({label}).\n"
                       + guest.get("banner", "")),
            "help_links": guest.get("help_links", []),
            "debugger": False,
        }

    def _interrupt(self, socket: str, idents: list[bytes], msg: dict) -> None:
        self.interrupt_guest()
        self.relay.reply(socket, idents, "interrupt_reply", {"status": "ok"}, msg["header"])

    def interrupt_guest(self) -> None:
        self.vm.interrupt()

    def _shutdown(self, socket: str, idents: list[bytes], msg: dict) -> None:
        restart = bool(msg["content"].get("restart"))
        self.vm.shutdown()
        self.relay.reply(socket, idents, "shutdown_reply", {"status": "ok", "restart": restart},
                         msg["header"])
        self.exiting = True

    # -- %smolvm lines, run on the host

    def _host_line(self, socket: str, idents: list[bytes], msg: dict) -> object:
        """A %smolvm line: its reply and idle come once it is done (line_runner.py)."""
        self.panel_host.parent = msg["header"]     # a panel it shows answers it
        self.lines.run(idents, msg)
        return _LATER

    def _host_comm(self, socket: str, idents: list[bytes], msg: dict) -> None:
        """A panel click (a comm of the host's)."""
        self.panel_host.handle(msg)


def _always(msg: dict) -> bool:
    return True


class _SerialThread:
    """Runs submitted callables one after another on a daemon thread, so a
    slow guest never holds up the kernel process's exit."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._jobs.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._jobs.get()
            try:
                fn()
            except Exception as exc:
                log.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)


def main(argv: list[str] | None = None, listening: dict[str, int] | None = None) -> int:
    """Run the kernel; ``listening`` maps port names to listening socket fds
    opened by :mod:`smolvm_kernel.launch`."""
    import argparse

    from smolvm_kernel.config import load_config

    ap = argparse.ArgumentParser(prog="python -m smolvm_kernel")
    ap.add_argument("-f", "--connection-file", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[smolvm-kernel] %(message)s")
    # Three threads hand messages to each other (I/O loop, relay, heartbeat);
    # the default 5 ms GIL switch interval shows up in every round trip.
    sys.setswitchinterval(0.0005)
    try:
        with open(args.connection_file) as fh:
            info = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"smolvm-kernel: cannot read the connection file {args.connection_file}: {exc}", file=sys.stderr)
        return 2
    from smolvm_kernel.errors import ConfigError

    try:
        config, config_error = load_config(), None
    except ConfigError as exc:
        log.warning("%s", exc)
        config = SandboxConfig.builtin()
        config_error = ConfigError("", None, f"{str(exc).rstrip('.')}. Fix the setting, then restart the kernel.")
    timeline.mark("kernel imported, config read")
    kernel = SmolVMKernel(info, config, listening=listening, config_error=config_error)
    # Jupyter names connection files kernel-<id>.json: the audit log says whose VM is whose.
    name = os.path.basename(args.connection_file)
    kernel.sandbox.audit_context["kernel_id"] = name[len("kernel-"):-len(".json")] \
        if name.startswith("kernel-") and name.endswith(".json") else name

    def on_sigint(signum, frame):
        # interrupt_mode "signal": the frontend's SIGINT means "interrupt the cell".
        kernel.interrupt_guest()

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, lambda *a: setattr(kernel, "exiting", True))
    try:
        kernel.run()
    finally:
        kernel.vm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
