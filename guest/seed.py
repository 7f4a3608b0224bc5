"""The VM's seed: per-VM settings the host hands over on a small read-only disk.

The disk (virtio serial ``smolvm-seed``) holds a 4-byte big-endian length and
a JSON object, written by the host into the VM's private run folder. Only
root can read the device. It carries what must exist before any channel to
the host does: the network address, and for the SSH transport the guest's
host key and the key the host logs in with.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

SEED_SERIAL = "smolvm-seed"
MAX_SEED = 64 * 1024
DROPBEAR_KEY = "/etc/dropbear/smolvm_host_key"
FORCED_COMMAND = ('command="PYTHONPATH=/opt/smolvm exec /usr/bin/python3 -u -m smolvm_guest.bridge",'
                  'no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty')


def log(msg: str) -> None:
    print(f"smolvm-seed: {msg}", file=sys.stderr, flush=True)


def _read(dev: str) -> dict | None:
    with open(dev, "rb") as fh:
        (length,) = struct.unpack("!I", fh.read(4))
        if length > MAX_SEED:
            return None
        try:
            data = json.loads(fh.read(length))
        except ValueError:
            return None
    return data if isinstance(data, dict) and data.get("smolvm_seed") == 1 else None


def read_seed() -> dict | None:
    """The seed, found by disk serial (QEMU) or, where disks have no
    serial we set (Firecracker), by its content on a read-only disk."""
    for serial_file in glob.glob("/sys/block/vd*/serial"):
        with open(serial_file) as fh:
            if fh.read().strip() == SEED_SERIAL:
                return _read("/dev/" + serial_file.split("/")[3])
    for ro_file in sorted(glob.glob("/sys/block/vd*/ro")):
        with open(ro_file) as fh:
            if fh.read().strip() == "1":
                seed = _read("/dev/" + ro_file.split("/")[3])
                if seed is not None:
                    return seed
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def configure_network(net: dict, mac: str | None = None) -> None:
    """The NIC's address, route and name servers (from the seed at boot, or
    from the host after a snapshot restore, with the VM's own MAC)."""
    dev = net.get("device", "eth0")
    if mac is not None:
        _ip("link", "set", dev, "down")
        _ip("link", "set", dev, "address", mac)
        _ip("addr", "flush", "dev", dev)
    _ip("link", "set", dev, "up")
    _ip("addr", "add", f"{net['address']}/{int(net['prefix'])}", "dev", dev)
    _ip("route", "replace", "default", "via", net["gateway"], "dev", dev)
    servers = [s for s in net.get("dns", []) if isinstance(s, str)][:3]
    write_resolv_conf(servers)
    log(f"{dev} {net['address']}/{net['prefix']} via {net['gateway']}")


def write_resolv_conf(servers: list[str], path: str = "/etc/resolv.conf") -> None:
    """The host's choice of name servers (SandboxConfig.dns), or none. Short
    time-outs: a server that stops answering costs a lookup seconds, not tens."""
    if os.path.islink(path):
        os.unlink(path)
    with open(path, "w") as fh:
        if not servers:
            fh.write("# no DNS for this VM (SandboxConfig.dns); names resolve from /etc/hosts only\n")
            return
        fh.write("# from the host (SandboxConfig.dns)\n")
        fh.write("".join(f"nameserver {s}\n" for s in servers))
        fh.write("options timeout:2 attempts:2\n")


#: The host's secret for the vsock link, written from the seed for the agent
#: (root's alone): any host user can connect to a guest's vsock port, so the
#: agent answers only a hello that carries it.
LINK_SECRET_FILE = "/run/smolvm/link-secret"


def install_link_secret(secret: str, path: str = LINK_SECRET_FILE) -> None:
    if not (isinstance(secret, str) and len(secret) >= 32):
        raise ValueError("the seed's link secret is malformed")
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)


def install_ssh(ssh: dict) -> list[str]:
    """Write the keys; return the dropbear command line to run."""
    os.makedirs("/etc/dropbear", mode=0o700, exist_ok=True)
    openssh_key = "/etc/dropbear/host_key.openssh"
    fd = os.open(openssh_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(ssh["host_key"])
    convert = shutil.which("dropbearconvert") or "/usr/lib/dropbear/dropbearconvert"
    subprocess.run([convert, "openssh", "dropbear", openssh_key, DROPBEAR_KEY], check=True, capture_output=True)
    os.unlink(openssh_key)
    os.makedirs("/root/.ssh", mode=0o700, exist_ok=True)
    with open("/root/.ssh/authorized_keys", "w") as fh:
        fh.write(f"{FORCED_COMMAND} {ssh['authorized_key'].strip()}\n")
    os.chmod("/root/.ssh/authorized_keys", 0o600)
    # -s/-g: no password logins at all; -j/-k: no port forwarding; -F -E:
    # foreground, log to stderr (the console).
    return ["dropbear", "-F", "-E", "-s", "-g", "-j", "-k", "-p", str(int(ssh.get("port", 22))),
            "-r", DROPBEAR_KEY]
