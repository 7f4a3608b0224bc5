"""The agent's link to the host: the virtio-serial port, or one listening socket.

The host writes frames to it (smolvm_guest.wire); on a link any host user can
reach (vsock), the agent hears a connection only after a hello with the link
secret the seed carried (read_secret).
"""

from __future__ import annotations

import glob
import os
import socket
import threading
import time

from smolvm_guest.wire import SERIAL_PORT_NAME, VSOCK_PORT

#: With the SSH transport the agent listens here; only root (the SSH forced
#: command) can connect.
AGENT_SOCKET = "/run/smolvm-agent/agent.sock"


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
            raise Accepted
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


class Accepted(Exception):
    """A new host connection was accepted; the poll set must change."""


def open_link() -> SerialLink | ListenerLink:
    with open("/proc/cmdline") as fh:
        cmdline = fh.read().split()
    if "smolvm.channel=vsock" in cmdline:
        return ListenerLink.vsock()
    if "smolvm.channel=ssh" in cmdline:
        return ListenerLink.unix()
    return SerialLink()


def read_secret(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None
