"""Run inside the guest: own the ipykernel and bridge it to the host's framed stream.

Started by :mod:`smolvm_guest.init` as root. The in-guest kernel runs as the
unprivileged ``user`` (uid 1000), so code in a cell cannot touch the agent,
the channel device or the kernel's connection file.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import signal
import sys
import time
import zlib

import zmq

from smolvm_guest import files, limits, seed, wire, workdir
from smolvm_guest.kernel import USER_GID, USER_HOME, USER_UID, GuestKernel, warmup_cell
from smolvm_guest.link import Accepted, open_link, read_secret
from smolvm_guest.outbox import Outbox
from smolvm_guest.system import add_entropy, log, meminfo, oom_kills, set_oom_score
from smolvm_guest.wire import SYNC_MAGIC, Channel

AGENT_VERSION = "0.1.0"
#: Files may be put/got only below these directories (after resolving links).
FILE_ROOTS = (USER_HOME, "/tmp")
MAX_FILE = 256 * 1024 * 1024
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
#: Most bytes one ``workdir_put`` request carries (the host batches below it).
MAX_BATCH = 16 * 1024 * 1024
#: Seconds a connection may stay without a hello carrying the link secret.
AUTH_TIMEOUT_S = 5.0
#: The smallest frame limit a host's hello may set (below it, a kernel_info
#: reply would not fit).
MIN_FRAME = 64 * 1024
#: While no host is connected, a virtio-serial port reads EOF at once (and
#: polls ready): the agent looks again after this pause.
LINK_RETRY_S = 0.05


def _cell_end(chan: Channel, parts: list[bytes]) -> str | None:
    """The cell a kernel message ends, by its parent's id: the ``execute_reply``
    on shell, or the ``idle`` status of an execute request on IOPub. The agent
    reads the two sockets apart, so either can come first, and a frontend stops
    listening at "idle": the folder's report must go out before both. A false
    positive (guest code can forge either) costs one scan, nothing more."""
    try:
        i = parts.index(b"<IDS|MSG>")
        header, parent = parts[i + 2], parts[i + 3]
        if chan == Channel.SHELL:
            if b"execute_reply" not in header:
                return None
        elif chan == Channel.IOPUB:
            if (b'"status"' not in header or b"execute_request" not in parent
                    or b"idle" not in parts[i + 5]):
                return None
        else:
            return None
        msg_id = json.loads(parent).get("msg_id")
    except (ValueError, IndexError, AttributeError, RecursionError):
        return None
    return msg_id if isinstance(msg_id, str) else None


# ---------------------------------------------------------------- agent

class Agent:
    """The agent's single-threaded poll loop (plus the outbox writer thread)."""

    def __init__(self, link) -> None:
        self.link = link
        self.outbox = Outbox(link)
        #: The fault injector (faults.py), only after a hello that asks for it.
        self.faults = None
        self.decoder = wire.FrameDecoder()
        self.ctx = zmq.Context()
        self.kernel: GuestKernel | None = None
        self.kernel_dead_reported = False
        self.oom_kills_at_start = oom_kills()
        self._cpu_prev: tuple[int, int] | None = None
        self._link_paused_until = 0.0
        self.shutting_down = False
        #: With a secret (vsock: any host user can connect), a connection is
        #: heard only after a hello that carries it, and one that does not
        #: send it within AUTH_TIMEOUT_S is hung up on. A link that needs one
        #: and has none (a lost or unreadable seed) hears no one: fail closed.
        self.secret = read_secret(seed.LINK_SECRET_FILE)
        if self.secret is None and getattr(link, "needs_secret", False):
            log("this link needs a secret and the seed carried none: every connection will be refused")
        self.authenticated = self._open_without_secret()
        self._accepted_at = time.monotonic()
        self._reject = False
        #: Whether the host has sent the kernel a message: from then on, code
        #: other than the agent's may have run in the VM.
        self.kernel_used = False
        #: The notebook's folder, watched once the host has copied it in (workdir.py).
        self.workdir: workdir.Watch | None = None
        #: The cell whose end was last reported (its reply and its idle both end it).
        self.workdir_reported_for: str | None = None

    # -- requests from the host

    def handle_agent(self, req: dict) -> None:
        op = req.get("op")
        rid = req.get("id")
        try:
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None and op == "fault" and self.faults is not None:
                handler = self.faults.op_fault
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
        if req.get("faults") is True and self.faults is None:
            # The host's death-matrix tests (faults.py); never asked for otherwise.
            from smolvm_guest.faults import Faults
            self.faults = Faults(self.outbox)
        max_frame = req.get("max_frame")
        if isinstance(max_frame, int) and not isinstance(max_frame, bool):
            self.outbox.max_frame = max(MIN_FRAME, min(max_frame, wire.MAX_FRAME))
        entropy = base64.b64decode(req.get("entropy", ""))
        if entropy:
            add_entropy(entropy)
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

    def op_interrupt(self, req: dict) -> dict:
        if self.kernel is None:
            raise ValueError("no kernel is running")
        self.kernel.interrupt()
        return {}

    def op_stats(self, req: dict) -> dict:
        mem = meminfo()
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

    def op_workdir_put(self, req: dict) -> dict:
        """Chunks of the notebook folder's files, all written in one child as the user."""
        items = req.get("files")
        if not isinstance(items, list):
            raise ValueError("files must be a list")
        chunks, carried = [], 0
        for item in items:
            root, parts = files.split_beneath(item["path"], USER_HOME, (USER_HOME,))
            data = base64.b64decode(item["data"])
            if item.get("z") is True:       # zlib, when it made the chunk smaller (the host's choice)
                inflate = zlib.decompressobj()
                data = inflate.decompress(data, MAX_BATCH + 1)
                if len(data) > MAX_BATCH or not inflate.eof:
                    raise ValueError(f"a compressed chunk is over {MAX_BATCH} bytes or incomplete")
            offset, total = int(item.get("offset", 0)), int(item["size"])
            carried += len(data)
            if offset < 0 or not 0 <= total <= MAX_FILE or offset + len(data) > total or carried > MAX_BATCH:
                raise ValueError(f"files are limited to {MAX_FILE} bytes and a batch to {MAX_BATCH}")
            chunks.append((root, parts, data, offset, total))
        if self.kernel_used:
            written = files.as_user(USER_UID, USER_GID, files.put_many, chunks)
        else:   # no code but the agent's has run here yet: no child needed (files.put_many)
            written = files.put_many(chunks, owner=(USER_UID, USER_GID))
        if req.get("watch") is True:
            self.workdir = workdir.Watch(USER_HOME)
        return {"written": written}

    def op_workdir_watch(self, req: dict) -> dict:
        """From now on, tell the host what changed in the home folder after each cell."""
        self.workdir = workdir.Watch(USER_HOME)
        return {"files": len(self.workdir.known)}

    def op_workdir_scan(self, req: dict) -> dict:
        """What changed since the last report, now (the host's last look before a stop)."""
        if self.workdir is None:
            raise ValueError("the folder is not watched")
        news = self.workdir.changes() or {"changed": [], "removed": [], "truncated": False}
        news.pop("event", None)
        return news

    def op_net(self, req: dict) -> dict:
        """A VM restored from a NIC shape's snapshot: this VM's address and MAC."""
        net, mac = req.get("net"), req.get("mac")
        if not (isinstance(net, dict) and isinstance(mac, str) and _MAC.fullmatch(mac)
                and all(isinstance(net.get(k), str) and _IPV4.fullmatch(net[k]) for k in ("address", "gateway"))
                and isinstance(net.get("prefix"), int) and net.get("device", "eth0") == "eth0"
                and isinstance(net.get("dns", []), list)):
            raise ValueError("net needs address, gateway, prefix, dns and a MAC")
        seed.configure_network(net, mac=mac)
        return {}

    def op_quiesce(self, req: dict) -> dict:
        """Before a snapshot: flush and drop caches so freed pages are zero
        (the kernel runs with init_on_free=1) and stay out of the saved state."""
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        with open("/proc/sys/vm/compact_memory", "w") as fh:
            fh.write("1")
        return {"mem_free_kib": meminfo().get("MemFree", 0)}

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
                self.kernel_used = True
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
                kernel.settling = kernel.execute_own(warmup_cell(key_fd, ack_fd, limits.KILLED_PIDS_FILE))
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
        if self.workdir is not None:
            ended = _cell_end(chan, parts)
            if ended is not None and ended != self.workdir_reported_for:
                self.workdir_reported_for = ended
                news = self.workdir.changes()
                if news is not None:
                    self.outbox.put_json(news)    # a priority frame: ahead of the reply and the idle
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
            oom = code == -signal.SIGKILL and oom_kills() > self.oom_kills_at_start
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
                    except Accepted:
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


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A memory bomb in a cell must take the guest kernel, never the agent
    # (the host would then see the VM go silent, not an out-of-memory error).
    set_oom_score(-1000)
    link = open_link()
    log(f"listening on {getattr(link, 'path', None) or link.listener.getsockname()}")
    Agent(link).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
