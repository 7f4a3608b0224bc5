"""SmolVM's side of a remote launch by a Jupyter gateway's kernel provisioner.

gateway_provisioners' ``DistributedProvisioner`` (in a Jupyter Server or
Kernel Gateway that clients reach with ``--gateway-url``) picks a host and
runs the kernelspec's argv there, over SSH, with four values filled in:

    --kernel-id ID --response-address IP:PORT --public-key KEY --port-range LOW..HIGH

(Enterprise Gateway 3 spells them ``--RemoteProcessProxy.kernel-id`` and so
on; both are accepted.) The launcher then, as the provisioners' documented
launch protocol asks:

1. chooses the kernel's five ports and a communication port on this host,
   inside the port range;
2. starts the SmolVM kernel on them (it boots the VM from this host's ready
   snapshot, under this host's policy and budget);
3. sends the connection information back to the response address, once:
   the JSON encrypted with a fresh AES-128 key (ECB, PKCS#7 padding), that key
   encrypted with the gateway's RSA public key (PKCS#1 v1.5), both base64 in
   ``{"version": 1, "key": ..., "conn_info": ...}``, base64 again;
4. answers on the communication port, one JSON object per connection:
   ``{"signum": 0}`` (is it alive?), ``{"signum": 2}`` (interrupt),
   ``{"signum": 15 | 9}`` (stop), ``{"shutdown": 1}`` (end the listener).

The launcher stays the kernel's parent and ends with it; the gateway places
kernels, the SmolVM kernel keeps charge of its VM.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PROTOCOL_VERSION = 1
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
#: Most bytes one request on the communication port may have.
MAX_REQUEST = 4096


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="smolvm-gateway-launch", description=__doc__.split("\n\n")[0])
    for name in ("kernel-id", "response-address", "public-key", "port-range", "spark-context-initialization-mode",
                 "transport-encryption", "kernel-class-name", "cluster-type", "notice-b64"):
        dest = name.replace("-", "_")
        ap.add_argument(f"--{name}", f"--RemoteProcessProxy.{name}", dest=dest, default=None)
    args = ap.parse_args(argv)
    if not args.kernel_id or not args.response_address or not args.public_key:
        ap.error("--kernel-id, --response-address and --public-key are required (the gateway fills them in)")
    if args.spark_context_initialization_mode not in (None, "", "none"):
        ap.error("SmolVM kernels have no Spark context: use --spark-context-initialization-mode none")
    if args.transport_encryption not in (None, "", "none", "auto"):
        ap.error(f"--transport-encryption {args.transport_encryption}: SmolVM kernels do not offer CurveZMQ; "
                 f"the gateway's kernelspec must not require it")
    return args


def port_range(text: str | None) -> tuple[int, int]:
    """``LOW..HIGH`` (``0..0`` or nothing: any port)."""
    if not text or text == "0..0":
        return 0, 0
    low, sep, high = text.partition("..")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise SystemExit(f"--port-range {text!r} is not LOW..HIGH") from None
    if not sep or not 1024 <= lo < hi <= 65535:
        raise SystemExit(f"--port-range {text!r} is not LOW..HIGH within 1024..65535")
    return lo, hi


def bind_ports(n: int, rng: tuple[int, int], ip: str = "0.0.0.0") -> list[socket.socket]:
    """``n`` listening TCP sockets on ports within ``rng`` (any port for 0..0)."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for _ in range(200):
                port = 0 if rng == (0, 0) else secrets.randbelow(rng[1] - rng[0] + 1) + rng[0]
                try:
                    s.bind((ip, port))
                    break
                except OSError:
                    continue
            else:
                s.close()
                raise SystemExit(f"no free port in {rng[0]}..{rng[1]}")
            s.listen(16)
            socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def encrypt_response(conn_info: dict, public_key_b64: str) -> bytes:
    """The payload the provisioner's response manager decodes (protocol version 1)."""
    from cryptography.hazmat.primitives import padding as sym_padding
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    public = serialization.load_der_public_key(base64.b64decode(public_key_b64))
    aes_key = os.urandom(16)
    padder = sym_padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(conn_info).encode()) + padder.finalize()
    enc = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
    sealed = enc.update(plain) + enc.finalize()
    wrapped = public.encrypt(aes_key, padding.PKCS1v15())
    body = {"version": PROTOCOL_VERSION, "key": base64.b64encode(wrapped).decode(),
            "conn_info": base64.b64encode(sealed).decode()}
    return base64.b64encode(json.dumps(body).encode())


def send_response(address: str, payload: bytes, timeout: float = 30.0) -> None:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)


def handle_request(raw: bytes, kernel: subprocess.Popen) -> bool:
    """One request on the communication port; False when the listener should end."""
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return True
    if not isinstance(req, dict):
        return True
    if req.get("shutdown"):
        return False
    signum = req.get("signum")
    if isinstance(signum, int) and not isinstance(signum, bool) and signum in (0, 2, 9, 15):
        if signum and kernel.poll() is None:
            # SIGINT: the kernel interrupts its guest's cell; SIGTERM/SIGKILL end it (and its VM).
            kernel.send_signal(signum)
    return True


def serve(comm: socket.socket, kernel: subprocess.Popen) -> int:
    """Answer the gateway until the kernel exits or it says shutdown."""
    comm.settimeout(0.5)
    while kernel.poll() is None:
        try:
            conn, _ = comm.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        with conn:
            conn.settimeout(2)
            data = b""
            try:
                while len(data) < MAX_REQUEST:
                    chunk = conn.recv(MAX_REQUEST)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
        if not handle_request(data[:MAX_REQUEST], kernel):
            break
    comm.close()       # a gateway polling a dead kernel finds no listener: it is gone
    try:
        return kernel.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kernel.kill()
        return kernel.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    socks = bind_ports(len(PORT_NAMES) + 1, port_range(args.port_range))
    comm, kernel_socks = socks[0], socks[1:]
    info = {name: s.getsockname()[1] for name, s in zip(PORT_NAMES, kernel_socks)}
    info.update(ip="0.0.0.0", transport="tcp", signature_scheme="hmac-sha256", key=str(uuid.uuid4()),
                kernel_name="")
    folder = Path(tempfile.mkdtemp(prefix="smolvm-gateway-"))
    conn_file = folder / f"kernel-{args.kernel_id}.json"
    fd = os.open(conn_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    for s in kernel_socks:
        s.close()        # the kernel's launcher binds them again at once (launch.py)
    launch = Path(__file__).resolve().parents[1] / "launch.py"      # the kernelspec's entry point
    env = {**os.environ, "KERNEL_ID": args.kernel_id}
    if args.notice_b64:
        # From SmolVM's placement: why this kernel is on this host (its last host died).
        try:
            env["SMOLVM_NOTICE"] = base64.b64decode(args.notice_b64, validate=True).decode()[:1000]
        except ValueError:
            pass
    kernel = subprocess.Popen([sys.executable, "-S", str(launch), "-f", str(conn_file)],
                              stdin=subprocess.DEVNULL, env=env)

    def stop(signum, frame):
        if kernel.poll() is None:
            kernel.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop)
    try:
        reply = dict(info, kernel_id=args.kernel_id, pid=os.getpid(), pgid=os.getpgid(0),
                     comm_port=comm.getsockname()[1])
        send_response(args.response_address, encrypt_response(reply, args.public_key))
        return serve(comm, kernel)
    finally:
        if kernel.poll() is None:
            kernel.terminate()
            try:
                kernel.wait(30)
            except subprocess.TimeoutExpired:
                kernel.kill()
        conn_file.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass
        time.sleep(0)

