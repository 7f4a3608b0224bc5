"""The kernelspec's entry point: listen on the kernel's ports, then start the kernel.

``python -S .../smolvm_kernel/launch.py -f CONNECTION_FILE``

A Jupyter client connects to a new kernel's ports a few milliseconds after
launching it. A port that nobody listens on yet refuses the connection, and
ZeroMQ tries again only 100-200 ms later; the kernel needs ~100 ms to import
its modules, so its first answer would wait for that retry. Started without
the site import (``-S``) and with builtin modules only, this file opens the
connection file's five listening sockets ~5 ms after exec, before the client's
first connection; those connections wait in the sockets' backlogs, and the
kernel's ZeroMQ sockets adopt the sockets (``ZMQ_USE_FD``). Anything
unexpected (another transport, an unreadable file, a port in use) leaves that
port to the kernel, which binds it itself as it always could.

It also keeps the working directory, the notebook's folder, off
``sys.path``: ``python -m`` puts it first, so a ``zmq.py`` that somebody left
next to a notebook would run in the kernel process, on the host.
"""

import os
import sys
import time

_EXEC_AT = time.time()

try:
    import _json
    import _socket
except ImportError:      # an unusual build: no head start, the kernel binds as before
    _json = _socket = None

PORTS = ("shell", "control", "stdin", "iopub", "hb")


class _JSONContext:
    """What the C JSON scanner reads from a decoder (the ``json`` package
    would import ``re``, which costs more than everything else here)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float    # NaN, Infinity


def read_connection_file(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start = len(text) - len(text.lstrip())
    try:
        info, end = _json.make_scanner(_JSONContext())(text, start)
    except StopIteration:    # the scanner's word for "no JSON value here"
        info, end = None, start
    if not isinstance(info, dict) or text[end:].strip():
        raise ValueError(f"{path} is not one JSON object")
    return info


def listen(info: dict) -> dict[str, int]:
    """Listening socket fds for the connection's TCP ports, by name; a port
    that cannot be bound here is left out."""
    if info.get("transport", "tcp") != "tcp":
        return {}
    ip = info.get("ip") or "127.0.0.1"
    family = _socket.AF_INET6 if ":" in ip else _socket.AF_INET
    fds = {}
    for name in PORTS:
        port = info.get(f"{name}_port")
        if not isinstance(port, int) or not 0 < port < 65536:
            continue
        sock = _socket.socket(family, _socket.SOCK_STREAM)
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            continue
        fds[name] = sock.detach()
    return fds


def without_folder(path: list[str], folder: str) -> list[str]:
    """``path`` without ``folder``, compared by real path (Python resolves
    links in the folder it puts first for a script; "" is the working one)."""
    folder = os.path.realpath(folder)
    return [p for p in path if os.path.realpath(p or ".") != folder]


def connection_file(argv: list[str]) -> str | None:
    for flag in ("-f", "--connection-file"):
        if flag in argv[:-1]:
            return argv[argv.index(flag) + 1]
    for arg in argv:
        if arg.startswith("--connection-file="):
            return arg.split("=", 1)[1]
    return None


def main() -> int:
    argv = sys.argv[1:]
    fds: dict[str, int] = {}
    path = connection_file(argv)
    if path is not None and _socket is not None:
        try:
            fds = listen(read_connection_file(path))
        except Exception:   # noqa: BLE001 - only a head start: the kernel reads
            pass            # the file again and says what is wrong with it
    listening_at = time.time()
    # Python put this file's folder (the package itself) first on sys.path;
    # the site directories come now, after the ports. (sys.flags.no_site
    # stays set: nothing on the host starts Python children that inherit it.)
    sys.path[:] = without_folder(sys.path, os.path.dirname(os.path.realpath(__file__)))
    import site

    site.main()
    from smolvm_kernel import timeline
    from smolvm_kernel.jupyter.kernel import main as kernel_main

    timeline.mark("launcher exec", _EXEC_AT)
    timeline.mark("ports listening", listening_at)
    return kernel_main(argv, listening=fds)


if __name__ == "__main__":
    sys.exit(main())
