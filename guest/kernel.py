"""The in-guest ipykernel: started as the unprivileged user, its sockets, its own requests.

The kernel's main program (kernel_main.py) and its warm-up cell
(kernel_warmup.py) are files of their own, run in the kernel by their text;
AFTER_RESTORE is one line, a request of the agent's own that no frontend sees.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import zmq

from smolvm_guest import limits
from smolvm_guest.system import log, set_oom_score
from smolvm_guest.wire import Channel


def _source(name: str) -> str:
    """The text of a file of this package that runs in the kernel, not here."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), encoding="utf-8") as fh:
        return fh.read()

RUN_DIR = "/run/smolvm"
USER_UID = USER_GID = 1000
USER_HOME = "/home/user"

#: The in-guest kernel, started as ipykernel_launcher would be, with its
#: memory bounded under an output flood: its IOPub PUB socket queues at most 16
#: messages for a slow reader (the agent) and drops the rest, and stdout or
#: stderr text waiting for the IO thread is flushed (the writer waits for it)
#: once it passes 1 MiB; ipykernel 6.29 would buffer both without end, until
#: the VM's memory ran out (an endless print loop ended in a guest panic).
#: A process the kernel forks is the out-of-memory killer's first choice in the
#: kernel's group (limits.py), before the kernel: a fork bomb's copies or a
#: multiprocessing worker go, the kernel and its variables stay.
KERNEL_MAIN = _source("kernel_main.py")
AGENT_MSG_PREFIX = "smolvm-agent:"
#: Run silently once the kernel is ready (every cold boot, so also every
#: snapshot's template). IPython imports its traceback machinery lazily, which
#: costs ~1 s under TCG the first time an error is shown -- otherwise that
#: second lands on the user's first interrupt. It also starts the thread that
#: re-keys the kernel after a snapshot restore: the agent writes the new
#: session key into a pipe, the thread sets it, reseeds the PRNGs Python code
#: seeded before the snapshot (the kernel's CRNG is reseeded first) and
#: answers on a second pipe. A thread, not a cell: a restored VM translates
#: every instruction afresh under TCG, and a cell's path costs ~150 ms there.
def warmup_cell(key_fd: int, ack_fd: int, killed_file: str) -> str:
    """The warm-up cell's code: kernel_warmup.py's function (only: nothing else
    of the file enters the user's namespace), then its call and its removal."""
    source = _source("kernel_warmup.py")
    return (source[source.index("def _smolvm_warmup("):]
            + f"_smolvm_warmup({int(key_fd)}, {int(ack_fd)}, {str(killed_file)!r})\ndel _smolvm_warmup\n")
#: Sent first thing at a restored VM's hello, under the old key, while the
#: agent does the rest of the hello: the path of an ordinary cell
#: (execute_input, a result's formatting) is then translated before the user's
#: first cell needs it. The new key goes to the re-key thread once the kernel
#: has accepted this request (its "busy"), and the host hears "ready" after
#: that; the user's first cell queues behind it. No output reaches the host, no
#: history entry and no change to ``_`` (the formatter is called directly and
#: the cell's value is None; a trailing ";" would not do: IPython looks for it
#: in the history, which this request does not enter).
AFTER_RESTORE = "get_ipython().display_formatter.format(0) and None\n"


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
        # The re-key pipes (see kernel_warmup.py): the kernel reads key_r, writes ack_w.
        key_r, self.key_w = os.pipe()
        self.ack_r, ack_w = os.pipe()
        self.rekey_fds = (key_r, ack_w)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", KERNEL_MAIN, "-f", conn_file],
            cwd=USER_HOME, env=env, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            user=USER_UID, group=USER_GID, extra_groups=[], start_new_session=True,
            pass_fds=self.rekey_fds,
        )
        # The agent keeps out of the OOM killer's reach (main()); the kernel,
        # which inherited that, must be the one it takes.
        set_oom_score(0, self.proc.pid)
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
            "msg_id": AGENT_MSG_PREFIX + uuid.uuid4().hex, "msg_type": msg_type,
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
        if len(parts) < i + 6 or AGENT_MSG_PREFIX.encode() not in parts[i + 3]:
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
        kernel_warmup.py and AFTER_RESTORE); :meth:`send_key` follows."""
        if self.key_w is None:
            raise ValueError("this kernel cannot take a new key (its re-key thread is gone: its warm-up failed)")
        if not self.ready:
            raise ValueError("the kernel is still starting under another key")
        self.ready = False
        self.new_key = key
        self.warming = self.execute_own(AFTER_RESTORE, silent=False)

    def send_key(self) -> None:
        """The new key to the re-key thread; the pipe stays open for the next
        restore's (a checkpoint restored again, a fork of one)."""
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
        answer = os.read(self.ack_r, 1)
        if answer != b"k":       # EOF: the thread is gone, no restore can re-key this kernel
            os.close(self.ack_r)
            self.ack_r = None
            self.close_rekey()
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
