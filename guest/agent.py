"""Run inside the guest: own the ipykernel and bridge it to the host's framed stream.

Started by :mod:`smolvm_guest.init` as root. The in-guest kernel runs as the
unprivileged ``user`` (uid 1000), so code in a cell cannot touch the agent,
the channel device or the kernel's connection file.
"""

from __future__ import annotations

import base64
import collections
import fcntl
import glob
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import zmq

from smolvm_guest import files, limits, seed, wire
from smolvm_guest.wire import SERIAL_PORT_NAME, SYNC_MAGIC, VSOCK_PORT, Channel

AGENT_VERSION = "0.1.0"
RUN_DIR = "/run/smolvm"
#: With the SSH transport the agent listens here; only root (the SSH forced
#: command) can connect.
AGENT_SOCKET = "/run/smolvm-agent/agent.sock"
USER_UID = USER_GID = 1000
USER_HOME = "/home/user"
#: Files may be put/got only below these directories (after resolving links).
FILE_ROOTS = (USER_HOME, "/tmp")
MAX_FILE = 256 * 1024 * 1024
#: Host-bound Jupyter frames waiting to be written; past this the agent stops
#: reading the kernel's sockets, so a flood backs up into ZMQ, not into RAM.
LOW_QUEUE_LIMIT = 256
#: Bytes of kernel output the agent holds for the host at most; beyond it the
#: agent stops reading the kernel, whose IOPub then drops (see _KERNEL_MAIN):
#: an output flood must not fill the VM's memory.
LOW_QUEUE_BYTES = 8 * 1024 * 1024
#: Seconds a connection may stay without a hello carrying the link secret.
AUTH_TIMEOUT_S = 5.0
#: The smallest frame limit a host's hello may set (below it, a kernel_info
#: reply would not fit).
MIN_FRAME = 64 * 1024
#: The in-guest kernel, started as ipykernel_launcher would be, with its
#: memory bounded under an output flood: its IOPub PUB socket queues at most 16
#: messages for a slow reader (the agent) and drops the rest, and stdout or
#: stderr text waiting for the IO thread is flushed (the writer waits for it)
#: once it passes 1 MiB; ipykernel 6.29 would buffer both without end, until
#: the VM's memory ran out (an endless print loop ended in a guest panic).
#: A process the kernel forks is the out-of-memory killer's first choice in the
#: kernel's group (limits.py), before the kernel: a fork bomb's copies or a
#: multiprocessing worker go, the kernel and its variables stay.
_KERNEL_MAIN = """\
import os, sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
def _smolvm_forked():
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("500")
    except OSError:
        pass
os.register_at_fork(after_in_child=_smolvm_forked)
import zmq
_socket = zmq.Context.socket
def _smolvm_socket(self, kind, *args, **kwargs):
    sock = _socket(self, kind, *args, **kwargs)
    if kind == zmq.PUB:
        sock.sndhwm = 16
    return sock
zmq.Context.socket = _smolvm_socket
from ipykernel import iostream, kernelapp
_write = iostream.OutStream.write
def _smolvm_write(self, string):
    n = _write(self, string)
    try:
        with self._buffer_lock:
            waiting = sum(b.tell() for b in self._buffers.values())
    except AttributeError:     # another ipykernel: its own buffering applies
        return n
    if waiting > 1 << 20 and self._is_master_process():
        self.flush()
    return n
iostream.OutStream.write = _smolvm_write
kernelapp.launch_new_instance()
"""
#: While no host is connected, a virtio-serial port reads EOF at once (and
#: polls ready): the agent looks again after this pause.
LINK_RETRY_S = 0.05
_AGENT_MSG_PREFIX = "smolvm-agent:"
#: Run silently once the kernel is ready (every cold boot, so also every
#: snapshot's template). IPython imports its traceback machinery lazily, which
#: costs ~1 s under TCG the first time an error is shown -- otherwise that
#: second lands on the user's first interrupt. It also starts the thread that
#: re-keys the kernel after a snapshot restore: the agent writes the new
#: session key into a pipe, the thread sets it, reseeds the PRNGs Python code
#: seeded before the snapshot (the kernel's CRNG is reseeded first) and
#: answers on a second pipe. A thread, not a cell: a restored VM translates
#: every instruction afresh under TCG, and a cell's path costs ~150 ms there.
_WARMUP = """\
def _smolvm_warmup(key_fd, ack_fd):
    import os, sys, threading
    kernel = get_ipython().kernel

    def rekey():
        # Whatever happens, the answer pipe is closed: the agent sees "k" or EOF.
        try:
            key = b""
            with os.fdopen(key_fd, "rb", buffering=0) as pipe:
                while not key.endswith(b"\\n"):
                    chunk = pipe.read(128)
                    if not chunk:
                        return
                    key += chunk
            import random, uuid
            kernel.session.key = key.strip()
            kernel.session.session = str(uuid.uuid4())   # the msg_id prefix, too
            random.seed()
            numpy_random = sys.modules.get("numpy.random")
            if numpy_random is not None:
                numpy_random.seed()
            os.write(ack_fd, b"k")
        finally:
            os.close(ack_fd)

    threading.Thread(target=rekey, name="smolvm-rekey", daemon=True).start()
    # An error in a cell (an interrupt included) formats its traceback with
    # stack_data: executing parses the source of every file in it (IPython's
    # interactiveshell.py too, ~12k nodes) and pygments compiles its Python
    # lexer (~0.6 s under TCG); both are cached per process. Only a real
    # cell's error path fills those caches: one nested cell here, its output
    # unseen (the agent drops its own requests' messages), no history entry.
    try:
        get_ipython().run_cell("raise KeyboardInterrupt", store_history=False)
    except Exception:
        pass   # only a warm-up: the re-key thread above is what must work
    finally:
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            sys.__dict__.pop(name, None)   # %debug must not find the warm-up's error
    # A child of this kernel killed at a limit (by the agent or by the group's
    # OOM killer, limits.py) stays a zombie, holding a slot of the process
    # limit, until waited for. After a cell in which the agent acted (it
    # rewrites the file), the kernel waits for each zombie child that SIGKILL
    # ended (other children are left to whoever started them).
    seen = [None]

    def reap_killed(*_):
        try:
            stamp = os.stat("{killed_file}").st_mtime_ns
        except OSError:
            return
        if stamp == seen[0]:
            return
        seen[0] = stamp
        me = str(os.getpid())
        for entry in os.listdir("/proc"):
            try:
                with open("/proc/" + entry + "/stat") as fh:
                    state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
                if state != "Z" or ppid != me:
                    continue
                pid = int(entry)
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if info is not None and info.si_code == os.CLD_KILLED and info.si_status == 9:
                    os.waitpid(pid, os.WNOHANG)
            except (OSError, ValueError):
                continue
    get_ipython().events.register("post_run_cell", reap_killed)
_smolvm_warmup({key_fd}, {ack_fd})
del _smolvm_warmup
"""
#: Sent first thing at a restored VM's hello, under the old key, while the
#: agent does the rest of the hello: the path of an ordinary cell
#: (execute_input, a result's formatting) is then translated before the user's
#: first cell needs it. The new key goes to the re-key thread once the kernel
#: has accepted this request (its "busy"), and the host hears "ready" after
#: that; the user's first cell queues behind it. No output reaches the host, no
#: history entry and no change to ``_`` (the formatter is called directly and
#: the cell's value is None; a trailing ";" would not do: IPython looks for it
#: in the history, which this request does not enter).
_AFTER_RESTORE = "get_ipython().display_formatter.format(0) and None\n"
_RNDADDENTROPY = 0x40085203
_RNDRESEEDCRNG = 0x5207


def log(msg: str) -> None:
    print(f"smolvm-agent: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- links

class SerialLink:
    """The virtio-serial port named ``org.smolvm.agent.0``.

    No udev runs in the guest, so the device node is found through sysfs.
    While no host is connected, reads return EOF at once: the agent then
    backs off instead of spinning.
    """

    reconnects_by_eof = True
    connected = True      # a host may write at any time; no one else can

    def __init__(self) -> None:
        self.path = self._find()
        self.fd = os.open(self.path, os.O_RDWR)

    @staticmethod
    def _find() -> str:
        deadline = time.monotonic() + 10
        while True:
            for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
                with open(name_file) as fh:
                    if fh.read().strip() == SERIAL_PORT_NAME:
                        return "/dev/" + name_file.split("/")[-2]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no virtio-serial port named {SERIAL_PORT_NAME}")
            time.sleep(0.05)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes:
        return os.read(self.fd, 1 << 20)

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def hang_up(self) -> None:
        """Nothing to close: the port stays open across host reconnects."""


class ListenerLink:
    """One host connection at a time on a listening socket: AF_VSOCK port 1024
    (Firecracker's hybrid vsock, QEMU vhost-vsock) or, with the SSH transport,
    a root-only Unix socket that the SSH forced command bridges to."""

    reconnects_by_eof = False
    #: Whether anyone but the host can connect (vsock: any host user can, so the
    #: agent hears a connection only after a hello with the link secret).
    needs_secret = False

    def __init__(self, listener: socket.socket, needs_secret: bool = False) -> None:
        self.needs_secret = needs_secret
        self.listener = listener
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def vsock(cls) -> ListenerLink:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, VSOCK_PORT))
        return cls(sock, needs_secret=True)

    @classmethod
    def unix(cls, path: str = AGENT_SOCKET) -> ListenerLink:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        return cls(sock)

    def fileno(self) -> int:
        return self.conn.fileno() if self.conn else self.listener.fileno()

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def read(self) -> bytes:
        if self.conn is None:
            conn, _ = self.listener.accept()
            with self._lock:
                self.conn = conn
            raise _Accepted
        return self.conn.recv(1 << 20)

    def write_all(self, data: bytes) -> None:
        with self._lock:
            conn = self.conn
        if conn is None:
            raise BrokenPipeError("no host connected")
        conn.sendall(data)

    def hang_up(self) -> None:
        with self._lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


class _Accepted(Exception):
    """A new host connection was accepted; the poll set must change."""


def open_link() -> SerialLink | ListenerLink:
    with open("/proc/cmdline") as fh:
        cmdline = fh.read().split()
    if "smolvm.channel=vsock" in cmdline:
        return ListenerLink.vsock()
    if "smolvm.channel=ssh" in cmdline:
        return ListenerLink.unix()
    return SerialLink()


# ---------------------------------------------------------------- outbox

class Outbox:
    """Frames for the host, written by one thread; priority frames go first."""

    def __init__(self, link) -> None:
        self.link = link
        self._high: collections.deque[bytes] = collections.deque()
        self._low: collections.deque[bytes] = collections.deque()
        self._low_bytes = 0
        #: The largest frame body the host accepts: it says so in its hello
        #: (a larger frame would end the channel, so it is dropped here, and
        #: the host is told).
        self.max_frame = wire.MAX_FRAME
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="outbox", daemon=True).start()

    def put(self, channel: Channel, body: bytes) -> None:
        if len(body) > self.max_frame:
            self.put_json({"event": "dropped", "channel": int(channel), "size": len(body),
                           "limit": self.max_frame})
            return
        frame = wire.encode_frame(channel, body)
        with self._cond:
            if channel in wire.PRIORITY_CHANNELS:
                self._high.append(frame)
            else:
                self._low.append(frame)
                self._low_bytes += len(frame)
            self._cond.notify()

    def put_json(self, obj: dict) -> None:
        self.put(Channel.AGENT, wire.encode_json(obj))

    def restart(self, preamble: bytes) -> None:
        """Drop everything queued for a previous host and send ``preamble`` first."""
        with self._cond:
            self._high.clear()
            self._low.clear()
            self._low_bytes = 0
            self._high.append(preamble)
            self._cond.notify()

    def inject(self, raw: bytes) -> None:
        """Send ``raw`` as it is, before anything queued (fault injection only)."""
        with self._cond:
            self._high.appendleft(raw)
            self._cond.notify()

    def low_full(self) -> bool:
        return len(self._low) >= LOW_QUEUE_LIMIT or self._low_bytes >= LOW_QUEUE_BYTES

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._high and not self._low:
                    self._cond.wait()
                if self._high:
                    frame = self._high.popleft()
                else:
                    frame = self._low.popleft()
                    self._low_bytes -= len(frame)
            try:
                self.link.write_all(frame)
            except OSError as exc:
                log(f"write to host failed: {exc}")
                time.sleep(0.05)


# ---------------------------------------------------------------- kernel

class GuestKernel:
    """The in-guest ipykernel process and the agent's ZMQ client sockets to it."""

    def __init__(self, ctx: zmq.Context, key: bytes) -> None:
        self.key = key
        self.ctx = ctx
        self.session = uuid.uuid4().hex
        self.ready = False
        self.kernel_info: dict = {}
        #: msg_id of the warm-up request that must finish before the host is
        #: told the kernel is ready for the first time.
        self.settling: str | None = None
        #: A key for the kernel's re-key thread, not yet confirmed by it.
        self.new_key: bytes | None = None
        #: msg_id of the request run while a restored VM is re-keyed.
        self.warming: str | None = None
        self._sent_info_at = 0.0
        os.makedirs(RUN_DIR, mode=0o711, exist_ok=True)
        kdir = os.path.join(RUN_DIR, "kernel")
        os.makedirs(kdir, mode=0o700, exist_ok=True)
        os.chown(kdir, USER_UID, USER_GID)
        base = os.path.join(kdir, "k")
        conn = {
            "transport": "ipc", "ip": base, "key": key.decode(),
            "signature_scheme": "hmac-sha256", "kernel_name": "python3",
            "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5,
        }
        conn_file = os.path.join(kdir, "connection.json")
        fd = os.open(conn_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(conn, fh)
        os.chown(conn_file, USER_UID, USER_GID)
        self.log_path = os.path.join(RUN_DIR, "kernel.log")
        env = {
            "HOME": USER_HOME, "USER": "user", "LOGNAME": "user", "SHELL": "/bin/sh",
            "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TERM": "xterm-256color",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # The re-key pipes (see _WARMUP): the kernel reads key_r, writes ack_w.
        key_r, self.key_w = os.pipe()
        self.ack_r, ack_w = os.pipe()
        self.rekey_fds = (key_r, ack_w)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _KERNEL_MAIN, "-f", conn_file],
            cwd=USER_HOME, env=env, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            user=USER_UID, group=USER_GID, extra_groups=[], start_new_session=True,
            pass_fds=self.rekey_fds,
        )
        # The agent keeps out of the OOM killer's reach (main()); the kernel,
        # which inherited that, must be the one it takes.
        _set_oom_score(0, self.proc.pid)
        # Its own group, bounded (limits.py): before it can run a cell.
        self.cgroup = limits.KernelCgroup.create()
        if self.cgroup is not None:
            try:
                self.cgroup.add(self.proc.pid)
            except OSError as exc:
                log(f"cannot put the kernel in its cgroup: {exc}")
                self.cgroup = None
        for fd in (log_fd, *self.rekey_fds):
            os.close(fd)
        ident = self.session.encode()
        self.sockets: dict[Channel, zmq.Socket] = {}
        for chan, port, kind in ((Channel.SHELL, 1, zmq.DEALER), (Channel.CONTROL, 4, zmq.DEALER),
                                 (Channel.STDIN, 3, zmq.DEALER), (Channel.IOPUB, 2, zmq.SUB)):
            sock = ctx.socket(kind)
            sock.linger = 0
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.rcvhwm = 8       # with the kernel's PUB limit: a flood is dropped, not held
            else:
                # ipykernel routes input_request to the stdin socket whose
                # identity equals the requesting shell socket's.
                sock.setsockopt(zmq.IDENTITY, ident)
            sock.connect(f"ipc://{base}-{port}")
            self.sockets[chan] = sock

    def poll_ready(self) -> None:
        """Ask for kernel_info until an iopub message proves the SUB socket is live."""
        now = time.monotonic()
        if not self.ready and self.settling is None and self.new_key is None \
                and now - self._sent_info_at > 0.5:
            self._sent_info_at = now
            self.send_own(Channel.SHELL, "kernel_info_request", {})

    def send_own(self, chan: Channel, msg_type: str, content: dict) -> str:
        header = {
            "msg_id": _AGENT_MSG_PREFIX + uuid.uuid4().hex, "msg_type": msg_type,
            "session": self.session, "username": "smolvm-agent", "version": "5.3",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
        }
        parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
        sig = hmac.new(self.key, b"".join(parts), hashlib.sha256).hexdigest().encode()
        self.sockets[chan].send_multipart([b"<IDS|MSG>", sig, *parts])
        return header["msg_id"]

    def execute_own(self, code: str, silent: bool = True) -> str:
        """Run ``code`` without history; its outputs never reach the host
        (``silent=False`` takes the path of an ordinary cell)."""
        return self.send_own(Channel.SHELL, "execute_request", {
            "code": code, "silent": silent, "store_history": False,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": False})

    def is_own(self, parts: list[bytes]) -> dict | None:
        """Return the content of a message answering the agent itself, else None."""
        try:
            i = parts.index(b"<IDS|MSG>")
        except ValueError:
            return None
        if len(parts) < i + 6 or _AGENT_MSG_PREFIX.encode() not in parts[i + 3]:
            return None
        # Code in a cell can publish on the kernel's sockets too: a message
        # that names the agent's prefix but is not well-formed is dropped
        # (an empty answer), never allowed to stop the agent.
        try:
            header, parent, content = (json.loads(parts[i + k]) for k in (2, 3, 5))
        except ValueError:
            return {"msg_type": None, "parent_id": None, "content": {}}
        if not all(isinstance(x, dict) for x in (header, parent, content)):
            return {"msg_type": None, "parent_id": None, "content": {}}
        return {"msg_type": header.get("msg_type"), "parent_id": parent.get("msg_id"), "content": content}

    def begin_rekey(self, key: bytes) -> None:
        """A VM restored from a snapshot: same kernel, new host and key (see
        _WARMUP and _AFTER_RESTORE); :meth:`send_key` follows."""
        if self.key_w is None:
            raise ValueError("this kernel cannot take a new key (it took one already, or its warm-up failed)")
        if not self.ready:
            raise ValueError("the kernel is still starting under another key")
        self.ready = False
        self.new_key = key
        self.warming = self.execute_own(_AFTER_RESTORE, silent=False)

    def send_key(self) -> None:
        try:
            os.write(self.key_w, self.new_key + b"\n")
        except OSError as exc:     # the kernel died: its exit is reported by check_kernel
            log(f"cannot hand the kernel its new key: {exc}")
        self.close_rekey()

    def close_rekey(self) -> None:
        if self.key_w is not None:
            os.close(self.key_w)
            self.key_w = None

    def finish_rekey(self) -> bool:
        """The re-key thread answered (True), or died first (False)."""
        answer = os.read(self.ack_r, 16)
        os.close(self.ack_r)
        self.ack_r = None
        if answer != b"k":
            self.new_key = None
            return False
        self.key, self.new_key = self.new_key, None
        self.ready = True
        return True

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_path) - n))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def rss_kib(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0


# ---------------------------------------------------------------- agent

class Agent:
    """The agent's single-threaded poll loop (plus the outbox writer thread)."""

    def __init__(self, link) -> None:
        self.link = link
        self.outbox = Outbox(link)
        self.decoder = wire.FrameDecoder()
        self.ctx = zmq.Context()
        self.kernel: GuestKernel | None = None
        self.kernel_dead_reported = False
        self.oom_kills_at_start = _oom_kills()
        self._cpu_prev: tuple[int, int] | None = None
        self._link_paused_until = 0.0
        self.shutting_down = False
        #: With a secret (vsock: any host user can connect), a connection is
        #: heard only after a hello that carries it, and one that does not
        #: send it within AUTH_TIMEOUT_S is hung up on. A link that needs one
        #: and has none (a lost or unreadable seed) hears no one: fail closed.
        self.secret = _read_secret(seed.LINK_SECRET_FILE)
        if self.secret is None and getattr(link, "needs_secret", False):
            log("this link needs a secret and the seed carried none: every connection will be refused")
        self.authenticated = self._open_without_secret()
        self._accepted_at = time.monotonic()
        self._reject = False

    # -- requests from the host

    def handle_agent(self, req: dict) -> None:
        op = req.get("op")
        rid = req.get("id")
        try:
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            result = handler(req)
            reply = {"id": rid, "ok": True, **(result or {})}
        except Exception as exc:  # report, never die on a bad request
            reply = {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.outbox.put_json(reply)

    def op_hello(self, req: dict) -> dict:
        if req.get("proto") != wire.PROTOCOL_VERSION:
            return {"proto": wire.PROTOCOL_VERSION, "mismatch": True}
        key = req.get("key", "")
        if not isinstance(key, str) or len(key) < 32:
            raise ValueError("hello needs a key of at least 32 hex characters")
        if self.kernel is not None and self.kernel.key != key.encode():
            # A VM restored from a snapshot: same kernel, new host. The kernel
            # starts on a request of its own at once (on the other vCPU while
            # this hello goes on); the new key follows once it has taken that
            # (the host's entropy is in by then), and "ready" after the key.
            self.kernel.begin_rekey(key.encode())
        max_frame = req.get("max_frame")
        if isinstance(max_frame, int) and not isinstance(max_frame, bool):
            self.outbox.max_frame = max(MIN_FRAME, min(max_frame, wire.MAX_FRAME))
        entropy = base64.b64decode(req.get("entropy", ""))
        if entropy:
            _add_entropy(entropy)
        if isinstance(req.get("time"), (int, float)):
            try:
                time.clock_settime(time.CLOCK_REALTIME, float(req["time"]))
            except OSError as exc:
                log(f"cannot set the clock: {exc}")
        if self.kernel is None:
            self.kernel = GuestKernel(self.ctx, key.encode())
        return {"proto": wire.PROTOCOL_VERSION, "agent": AGENT_VERSION,
                "kernel_ready": self.kernel.ready, "python": sys.version.split()[0]}

    def op_ping(self, req: dict) -> dict:
        return {"t": time.time()}

    def op_fault(self, req: dict) -> dict:
        """Fault injection for the host's death-matrix and channel tests: a guest
        kernel panic, the agent's own death, root flooding the console, a flood
        of frames that are not Jupyter messages, bytes that are not a frame.
        Only the host reaches this (the channel device is root's); guest code
        can cause none of them."""
        what = req.get("what")
        if what == "panic":
            os.sync()
            with open("/proc/sysrq-trigger", "w") as fh:
                fh.write("c")
        elif what == "agent":
            os.kill(os.getpid(), signal.SIGKILL)
        elif what in ("console", "flood"):
            # Root printing to the console without end; a compromised agent
            # flooding the channel with frames that are not Jupyter messages.
            n = max(0, min(int(req.get("n", 0)), 64 * 1024 * 1024))
            target = self._fault_console if what == "console" else self._fault_flood
            threading.Thread(target=target, args=(n,), daemon=True).start()
            return {}
        elif what == "garbage":
            self.outbox.inject(b"\xff" * 64)     # a header no host accepts
            return {}
        raise ValueError(f"unknown fault {what!r}; use panic, agent, console, flood or garbage")

    @staticmethod
    def _fault_console(n: int) -> None:
        line = b"smolvm console fault " + b"x" * 1002 + b"\n"
        with open("/dev/console", "wb", buffering=0) as fh:
            for _ in range(n // len(line) + 1):
                fh.write(line)

    def _fault_flood(self, n: int) -> None:
        junk = [os.urandom(1024), wire.pack_parts([b"<IDS|MSG>", b"0" * 64, b"{}", b"{}", b"{}", b"{}"])]
        for i in range(n):
            while self.outbox.low_full():
                time.sleep(0.001)
            self.outbox.put(Channel.IOPUB, junk[i % 2])

    def op_interrupt(self, req: dict) -> dict:
        if self.kernel is None:
            raise ValueError("no kernel is running")
        self.kernel.interrupt()
        return {}

    def op_stats(self, req: dict) -> dict:
        mem = _meminfo()
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle, total = fields[3] + fields[4], sum(fields[:8])
        cpu_pct = None
        if self._cpu_prev is not None and total > self._cpu_prev[1]:
            d_idle, d_total = idle - self._cpu_prev[0], total - self._cpu_prev[1]
            cpu_pct = round(100.0 * (1 - d_idle / d_total), 1)
        self._cpu_prev = (idle, total)
        st = os.statvfs("/")
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return {
            "vcpus": os.cpu_count(), "mem_total_kib": mem.get("MemTotal", 0),
            "mem_available_kib": mem.get("MemAvailable", 0), "cpu_percent": cpu_pct,
            "disk_total_bytes": st.f_blocks * st.f_frsize,
            "disk_used_bytes": (st.f_blocks - st.f_bfree) * st.f_frsize,
            "uptime_s": uptime, "loadavg": os.getloadavg()[0],
            "kernel_pid": self.kernel.proc.pid if self.kernel else None,
            "kernel_rss_kib": self.kernel.rss_kib() if self.kernel else 0,
            "kernel_ready": bool(self.kernel and self.kernel.ready),
        }

    def op_put(self, req: dict) -> dict:
        """One chunk of a file from the host, written as the kernel's user (see files)."""
        root, parts = files.split_beneath(req["path"], USER_HOME, FILE_ROOTS)
        data = base64.b64decode(req["data"])
        offset = int(req.get("offset", 0))
        total = req.get("size")
        total = int(total) if total is not None else None
        if offset < 0 or offset + len(data) > MAX_FILE or (total is not None and not 0 <= total <= MAX_FILE):
            raise ValueError(f"files are limited to {MAX_FILE} bytes")
        end = files.as_user(USER_UID, USER_GID, files.put, root, parts, data, offset, total)
        return {"size": end}

    def op_get(self, req: dict) -> dict:
        """A chunk of a regular file for the host, read as the kernel's user (see files)."""
        root, parts = files.split_beneath(req["path"], USER_HOME, FILE_ROOTS)
        offset = int(req.get("offset", 0))
        length = min(int(req.get("length", 1 << 20)), 4 << 20)
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        size, data = files.as_user(USER_UID, USER_GID, files.get, root, parts, offset, length, MAX_FILE)
        return {"size": size, "data": base64.b64encode(data).decode()}

    def op_quiesce(self, req: dict) -> dict:
        """Before a snapshot: flush and drop caches so freed pages are zero
        (the kernel runs with init_on_free=1) and stay out of the saved state."""
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        with open("/proc/sys/vm/compact_memory", "w") as fh:
            fh.write("1")
        return {"mem_free_kib": _meminfo().get("MemFree", 0)}

    def op_shutdown(self, req: dict) -> dict:
        self.shutting_down = True
        return {}

    # -- the loop

    def on_link_data(self, data: bytes) -> None:
        for chan, body in self.decoder.feed(data):
            if not self.authenticated:
                self._authenticate(chan, body)
                if not self.authenticated:
                    return
            if chan == Channel.AGENT:
                req = wire.decode_json(body)
                if req.get("op") == "hello":
                    nonce = bytes.fromhex(req.get("nonce", ""))
                    self.outbox.restart(SYNC_MAGIC + nonce)
                self.handle_agent(req)
            elif self.kernel is not None:
                self.kernel.sockets[chan].send_multipart(wire.unpack_parts(body))
            else:
                log(f"dropping a {chan.name} message: no kernel yet")

    def _open_without_secret(self) -> bool:
        """Whether a new connection is heard without a hello carrying the secret:
        only on a link no one but the host can reach (virtio-serial, the SSH
        transport's root-only socket) and with no secret set."""
        return self.secret is None and not getattr(self.link, "needs_secret", False)

    def _authenticate(self, chan: Channel, body: bytes) -> None:
        """The first frame of a connection must be a hello with the link secret;
        anything else gets the connection hung up (see run)."""
        try:
            req = wire.decode_json(body) if chan == Channel.AGENT else {}
        except wire.FrameError:
            req = {}
        given = req.get("secret") if req.get("op") == "hello" else None
        if (self.secret is not None and isinstance(given, str)
                and hmac.compare_digest(given.encode(), self.secret)):
            self.authenticated = True
            return
        log("a connection without the link secret: hung up")
        self._reject = True

    def on_kernel_message(self, chan: Channel, parts: list[bytes]) -> None:
        kernel = self.kernel
        own = kernel.is_own(parts)
        if own is not None:
            if own["msg_type"] == "kernel_info_reply":
                kernel.kernel_info = own["content"]
            elif (own["msg_type"] == "status" and kernel.warming is not None
                  and own["parent_id"] == kernel.warming and kernel.new_key is not None
                  and kernel.key_w is not None and own["content"].get("execution_state") == "busy"):
                # The kernel has verified the request under the old key.
                kernel.send_key()
            elif (chan == Channel.IOPUB and kernel.kernel_info and not kernel.ready
                  and kernel.settling is None and kernel.new_key is None):
                # The iopub socket is live: warm up, then say ready.
                key_fd, ack_fd = kernel.rekey_fds
                kernel.settling = kernel.execute_own(_WARMUP.format(key_fd=key_fd, ack_fd=ack_fd,
                                                                   killed_file=limits.KILLED_PIDS_FILE))
            elif (own["msg_type"] == "execute_reply" and kernel.settling is not None
                  and own["parent_id"] == kernel.settling):
                kernel.settling = None
                if own["content"].get("status") != "ok":
                    # No re-key thread: a snapshot of this VM could not take a new key.
                    log(f"the warm-up failed: {own['content'].get('evalue')}")
                    kernel.close_rekey()
                kernel.ready = True
                self.say_ready()
            return
        if chan == Channel.SHELL:
            self.check_limits(force=True)    # a reply ends the cell: say it first
        try:
            body = wire.pack_parts(parts)
        except wire.FrameError as exc:
            log(f"dropping a {chan.name} message: {exc}")
            return
        self.outbox.put(chan, body)

    def say_ready(self) -> None:
        self.outbox.put_json({"event": "kernel_ready", "kernel_info": self.kernel.kernel_info})

    def on_rekeyed(self) -> None:
        kernel = self.kernel
        if not kernel.finish_rekey():
            self.kernel_dead_reported = True
            self.outbox.put_json({"event": "kernel_died", "code": kernel.proc.poll(),
                                  "log": "the kernel's re-key thread ended without taking the new key\n"
                                         + kernel.log_tail()})
            return
        self.say_ready()

    def check_kernel(self) -> None:
        kernel = self.kernel
        if kernel is None or self.kernel_dead_reported:
            return
        code = kernel.proc.poll()
        if code is not None:
            self.kernel_dead_reported = True
            # The VM's OOM killer is the usual reason a kernel dies with SIGKILL.
            oom = code == -signal.SIGKILL and _oom_kills() > self.oom_kills_at_start
            self.outbox.put_json({"event": "kernel_died", "code": code, "oom": oom, "log": kernel.log_tail()})
            return
        kernel.poll_ready()
        self.check_limits()

    def check_limits(self, force: bool = False) -> None:
        """After a fork bomb: the processes it left are killed, and the host told."""
        kernel = self.kernel
        if kernel is None or kernel.cgroup is None:
            return
        hit = kernel.cgroup.reap_after_limit(keep=kernel.proc.pid, force=force)
        if hit is not None and kernel.proc.poll() is None:   # the kernel's own death is told by check_kernel
            what, killed = hit
            limit = limits.KERNEL_PIDS if what == "processes" else kernel.cgroup.mem_max_kib // 1024
            self.outbox.put_json({"event": "limit", "what": what, "limit": limit, "killed": killed})

    def run(self) -> None:
        poller = zmq.Poller()
        link_registered = False
        registered: set[Channel] = set()
        ack_fd = None     # the re-key thread's answer pipe, while one is awaited
        while not self.shutting_down:
            now = time.monotonic()
            want_link = now >= self._link_paused_until
            if want_link and not link_registered:
                poller.register(self.link.fileno(), zmq.POLLIN)
                link_registered = True
            want_kernel = self.kernel is not None and not self.outbox.low_full()
            for chan, sock in (self.kernel.sockets.items() if self.kernel else ()):
                if want_kernel and chan not in registered:
                    poller.register(sock, zmq.POLLIN)
                    registered.add(chan)
                elif not want_kernel and chan in registered:
                    poller.unregister(sock)
                    registered.discard(chan)
            if ack_fd is None and self.kernel is not None and self.kernel.new_key is not None:
                ack_fd = self.kernel.ack_r
                poller.register(ack_fd, zmq.POLLIN)
            timeout = 50 if not want_kernel and self.kernel else 200
            if not want_link:
                # Listen again when the pause ends, not up to 200 ms later at
                # the next kernel message: a host may be there by then.
                timeout = min(timeout, int((self._link_paused_until - now) * 1000) + 1)
            events = dict(poller.poll(timeout))
            if ack_fd is not None and ack_fd in events:
                poller.unregister(ack_fd)
                ack_fd = None
                self.on_rekeyed()
            fd = self.link.fileno()
            silent = (not self.authenticated and self.link.connected
                      and time.monotonic() - self._accepted_at > AUTH_TIMEOUT_S)
            if link_registered and (fd in events or silent):
                data = b""
                if silent:
                    log("a connection sent no hello with the link secret in time: hung up")
                else:
                    try:
                        data = self.link.read()
                    except _Accepted:
                        poller.unregister(fd)
                        link_registered = False
                        self.decoder.reset()
                        self.authenticated = self._open_without_secret()
                        self._accepted_at = time.monotonic()
                        continue
                    except OSError as exc:
                        log(f"read from host failed: {exc}")
                if data:
                    try:
                        self.on_link_data(data)
                    except wire.FrameError as exc:
                        log(f"protocol error from host, resynchronising: {exc}")
                        self.decoder.reset()
                if not data or self._reject:
                    # Host gone (or not yet there, or not the host): back off, then listen again.
                    poller.unregister(fd)
                    link_registered = False
                    self.decoder.reset()
                    self.link.hang_up()
                    if self.link.reconnects_by_eof:
                        self._link_paused_until = time.monotonic() + LINK_RETRY_S
                    self._reject = False
                    self.authenticated = self._open_without_secret()
            for chan in list(registered):
                sock = self.kernel.sockets[chan]
                if sock in events:
                    for _ in range(64):
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            self.on_kernel_message(chan, parts)
                        except Exception as exc:   # the kernel's sockets carry what cells send too
                            log(f"dropping a {chan.name} message: {type(exc).__name__}: {exc}")
            self.check_kernel()
        # Give the outbox a moment to deliver the shutdown reply.
        time.sleep(0.1)


def _read_secret(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    return out


def _add_entropy(data: bytes) -> None:
    """Mix host entropy into the pool and credit it (struct rand_pool_info)."""
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            fcntl.ioctl(fd, _RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            # Credited entropy alone waits for the next scheduled reseed; a
            # restored snapshot must not hand out the template's stream meanwhile.
            fcntl.ioctl(fd, _RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as exc:
        log(f"cannot add entropy: {exc}")


def _oom_kills() -> int:
    """How many processes the VM's out-of-memory killer has killed since boot."""
    try:
        with open("/proc/vmstat") as fh:
            for line in fh:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _set_oom_score(value: int, pid: int | str = "self") -> None:
    """Set a process's OOM score adjustment (by default the caller's)."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as fh:
            fh.write(str(value))
    except OSError:
        pass


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A memory bomb in a cell must take the guest kernel, never the agent
    # (the host would then see the VM go silent, not an out-of-memory error).
    _set_oom_score(-1000)
    link = open_link()
    log(f"listening on {getattr(link, 'path', None) or link.listener.getsockname()}")
    Agent(link).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
