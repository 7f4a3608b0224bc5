"""The SSH transport: the agent's framed stream over a paramiko session.

The host makes both keys of every VM: the guest's host key and the client
key it logs in with (Ed25519). The guest gets the host key's private half
and the client key's public half through the VM's seed disk; the client
key's private half never leaves this process. The host key is pinned: the
connection is refused unless the server proves that exact key (paramiko's
RejectPolicy with that one known key; no AutoAddPolicy, no WarningPolicy).
The guest's SSH server accepts only that client key, only for the forced
command that joins the session to the agent, and no passwords.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import logging
import socket
import threading
import time

from smolvm_kernel.errors import SmolVMError

log = logging.getLogger("smolvm_kernel.ssh")
SSH_USER = "root"
SSH_PORT = 22


class HostKeyMismatch(SmolVMError, ConnectionError):
    """The guest's SSH server did not prove the host key pinned for this VM."""


def fingerprint(public_line: str) -> str:
    """OpenSSH-style SHA256 fingerprint of an ``ssh-ed25519 AAAA...`` line."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclasses.dataclass(frozen=True, repr=False)
class SSHKeys:
    host_private: str      # OpenSSH PEM, for the guest (seed disk)
    host_public: str       # "ssh-ed25519 AAAA...", pinned by the host
    client_private: str    # OpenSSH PEM, stays in this process
    client_public: str     # for the guest's authorized_keys

    def __repr__(self) -> str:   # never print private keys
        return f"<SSHKeys host {fingerprint(self.host_public)}>"

    @classmethod
    def generate(cls) -> SSHKeys:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        def pair() -> tuple[str, str]:
            key = Ed25519PrivateKey.generate()
            private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()).decode()
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH).decode()
            return private, public

        host, client = pair(), pair()
        return cls(host[0], host[1], client[0], client[1])

    def seed(self) -> dict:
        """What the guest needs (and nothing else)."""
        return {"host_key": self.host_private, "authorized_key": self.client_public, "port": SSH_PORT}


def _connect_once(ip: str, port: int, keys: SSHKeys, sock: socket.socket, timeout: float):
    import paramiko

    client = paramiko.SSHClient()
    pinned = paramiko.Ed25519Key(data=base64.b64decode(keys.host_public.split()[1]))
    name = ip if port == 22 else f"[{ip}]:{port}"
    client.get_host_keys().add(name, pinned.get_name(), pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(ip, port, username=SSH_USER, sock=sock,
                       pkey=paramiko.Ed25519Key(file_obj=io.StringIO(keys.client_private)),
                       look_for_keys=False, allow_agent=False, timeout=timeout,
                       banner_timeout=timeout, auth_timeout=timeout)
    except paramiko.BadHostKeyException as exc:
        client.close()
        got = f"{exc.key.get_name()} {exc.key.get_base64()}"
        raise HostKeyMismatch(
            f"the SSH server at {ip}:{port} presented host key {fingerprint(got)}, not the key pinned "
            f"for this VM ({fingerprint(keys.host_public)}); refusing to connect") from None
    except BaseException:
        client.close()
        raise
    chan = client.get_transport().open_session(timeout=timeout)
    chan.exec_command("smolvm-agent")   # the guest forces the bridge command anyway
    return client, chan


def connect(ip: str, keys: SSHKeys, *, port: int = SSH_PORT, netns: str = "",
            timeout: float = 30.0, alive=lambda: True):
    """Log in (retrying while the guest's server comes up); returns (client, channel)."""
    import paramiko

    from smolvm_kernel.host.net import in_netns

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline and alive():
        left = max(0.5, deadline - time.monotonic())
        try:
            sock = in_netns(netns, lambda: socket.create_connection((ip, port), timeout=min(2.0, left)))
        except OSError as exc:      # not listening yet
            last = exc
            time.sleep(0.2)
            continue
        try:
            return _connect_once(ip, port, keys, sock, min(10.0, left))
        except HostKeyMismatch:
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            last = exc
            time.sleep(0.2)
    raise ConnectionError(f"no SSH session with {ip}:{port} within {timeout:.0f} s: {last}")


def _pump(chan, sock: socket.socket) -> None:
    """Copy both ways between a paramiko channel and one end of a socketpair."""
    def shut_sock() -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    for name, recv, send, done in (("down", chan.recv, sock.sendall, shut_sock),
                                   ("up", sock.recv, chan.sendall, chan.close)):
        threading.Thread(target=_copy, args=(recv, send, done), name=f"smolvm-ssh-{name}",
                         daemon=True).start()


def _copy(recv, send, done) -> None:
    """``send`` what ``recv`` returns until end of stream or an error; then ``done()``."""
    try:
        while data := recv(1 << 16):
            send(data)
    except OSError:
        pass
    finally:
        done()


async def open_channel(ip: str, keys: SSHKeys, *, netns: str = "", timeout: float = 30.0,
                       alive=lambda: True):
    """An asyncio (reader, writer, client) over an SSH session to the guest agent."""
    client, chan = await asyncio.to_thread(connect, ip, keys, netns=netns, timeout=timeout, alive=alive)
    ours, theirs = socket.socketpair()
    _pump(chan, theirs)
    reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 22)
    return reader, writer, client
