"""The SSH transport's forced command: join this SSH session to the agent.

dropbear runs ``python3 -m smolvm_guest.bridge`` for the host's key (and for
nothing else: the key is restricted to this command). It copies bytes both
ways between stdin/stdout and the agent's root-only Unix socket until either
side closes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

from smolvm_guest.link import AGENT_SOCKET


def _connect(deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(AGENT_SOCKET)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> int:
    sock = _connect(time.monotonic() + 30)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()

    def upstream() -> None:
        try:
            while True:
                data = os.read(stdin, 1 << 16)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    threading.Thread(target=upstream, daemon=True).start()
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(stdout, view):]
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
