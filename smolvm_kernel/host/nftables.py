"""nftables for smolvm's VMs: each VM's table of rules, and IPv4 forwarding switched on for TAPs only.

What the project loads is text for ``nft -f``, made by pure functions
(unit-tested) from a VM's lease (net.py) and its egress allowlist:

- :func:`render_rules`: one table per VM, ``inet smolvm_<vm id>``, which the
  project owns alone: masquerade for the VM's address, and these rules
  always: no traffic to other VMs, none to 169.254.0.0/16 (cloud metadata),
  none to the host's own addresses (only replies to connections the host
  opened, such as its SSH session); optionally an egress allowlist of CIDRs
  and ports;
- :func:`render_guard`: while smolvm has switched IPv4 forwarding on in a
  namespace (it does only if it was off, :func:`enable_forwarding`), a guard
  table drops forwarding between interfaces that are not smolvm TAPs; the
  last VM's TAP switches it off again (:func:`release_forwarding`).

nft works in the network namespace of the thread that runs it: the callers
(net.py) run these in the VM's namespace.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from typing import TYPE_CHECKING

from smolvm_kernel.errors import NetworkError

if TYPE_CHECKING:
    from smolvm_kernel.host.net import Allow, Lease

#: Every smolvm TAP's name starts with this (net.py names them): the rules
#: and the guard match all of them by it.
TAP_PREFIX = "smv"
#: Every VM's table is this and its id.
TABLE_PREFIX = "smolvm_"
METADATA_NET = "169.254.0.0/16"
#: Not reachable from a VM unless an egress_allow entry names them: private
#: networks (the host's LAN, other bridges, a cloud's VPC), shared address
#: space (100.64/10, where one cloud serves its metadata), Azure's wireserver,
#: "this network", multicast and the reserved block.
PRIVATE_NETS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "168.63.129.16/32",
                "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")


def find_nft() -> str | None:
    """The nft binary (a non-root PATH often lacks /usr/sbin)."""
    return shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)


def render_rules(lease: Lease, allow: Iterable[Allow] = (), dns: Iterable[str] = (),
                 max_connections: int = 512, connection_rate: int = 100) -> str:
    """The VM's nftables table, as ``nft -f`` input (pure; unit-tested).

    In order: what is never allowed (spoofing, metadata, other VMs, IPv6);
    the connection limits (at most ``max_connections`` open at once, new ones
    at ``connection_rate`` a second); the VM's name servers on port 53
    (``dns``); the allowlist's entries;
    private ranges (:data:`PRIVATE_NETS`); then, without an allowlist,
    anything else."""
    tap, guest = lease.tap, lease.guest_ip
    allow = list(allow)
    lines = [
        f"table inet {lease.nft_table} {{",
        "  chain forward {",
        "    type filter hook forward priority filter - 10; policy accept;",
        f'    iifname "{tap}" ip saddr != {guest} drop',
        f'    iifname "{tap}" ip daddr {METADATA_NET} drop',
        f'    iifname "{tap}" oifname "{TAP_PREFIX}*" drop',
        f'    iifname "{tap}" meta nfproto ipv6 drop',
        f'    iifname "{tap}" ct state new ct count over {max_connections} drop',
        f'    iifname "{tap}" ct state new limit rate over {connection_rate}/second '
        f'burst {connection_rate} packets drop',
    ]
    servers = ", ".join(dns)
    if servers:
        lines.append(f'    iifname "{tap}" ip daddr {{ {servers} }} meta l4proto {{ tcp, udp }} th dport 53 accept')
    if allow:
        for entry in allow:
            if entry.ports:
                ports = ", ".join(str(p) for p in entry.ports)
                lines.append(f'    iifname "{tap}" ip daddr {entry.net} meta l4proto {{ tcp, udp }} '
                             f'th dport {{ {ports} }} accept')
            else:
                lines.append(f'    iifname "{tap}" ip daddr {entry.net} accept')
        lines.append(f'    iifname "{tap}" drop')
    else:
        lines.append(f'    iifname "{tap}" ip daddr {{ {", ".join(PRIVATE_NETS)} }} drop')
        lines.append(f'    iifname "{tap}" accept')
    lines += [
        f'    oifname "{tap}" ct state established,related accept',
        f'    oifname "{tap}" drop',
        "  }",
        "  chain input {",
        "    type filter hook input priority filter - 10; policy accept;",
        f'    iifname "{tap}" ct state established,related accept',
        f'    iifname "{tap}" drop',
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    ip saddr {guest} oifname != "{tap}" masquerade',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


# -- IPv4 forwarding

#: Exists in a namespace while smolvm has switched IPv4 forwarding on there:
#: forwarding is then only for smolvm's TAPs, and goes off again with the last.
GUARD_TABLE = "smolvm_forwarding"
_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


def render_guard() -> str:
    """The guard: no forwarding between interfaces that are not smolvm TAPs."""
    return (f"table inet {GUARD_TABLE} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter - 20; policy accept;\n"
            f'    iifname != "{TAP_PREFIX}*" oifname != "{TAP_PREFIX}*" drop\n'
            "  }\n"
            "}\n")


def _forwarding_lock(netns: str):
    """An exclusive lock for one namespace's forwarding switch, across processes."""
    folder = "/run/lock" if os.path.isdir("/run/lock") else "/tmp"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", netns) or "host"
    fd = os.open(os.path.join(folder, f"smolvm-forwarding-{name}.lock"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _has_guard(nft: str) -> bool:
    return subprocess.run([nft, "list", "table", "inet", GUARD_TABLE], capture_output=True).returncode == 0


def enable_forwarding(nft: str, netns: str) -> None:
    """Switch IPv4 forwarding on in this thread's namespace, if it is off, for
    smolvm's TAPs only (the guard table). A host that forwards already is left
    as it is."""
    fd = _forwarding_lock(netns)
    try:
        with open(_IP_FORWARD) as fh:
            if fh.read().strip() == "1":
                return
        load(nft, render_guard())
        with open(_IP_FORWARD, "w") as fh:
            fh.write("1")
    finally:
        os.close(fd)


def release_forwarding(nft: str, netns: str) -> list[str]:
    """Once no smolvm TAP is left in this thread's namespace, switch forwarding
    back off if smolvm switched it on (the guard table says so)."""
    from pyroute2 import IPRoute

    fd = _forwarding_lock(netns)
    try:
        if not _has_guard(nft):
            return []
        with IPRoute() as ipr:
            names = [link.get_attr("IFLA_IFNAME") or "" for link in ipr.get_links()]
        if any(name.startswith(TAP_PREFIX) for name in names):
            return []
        with open(_IP_FORWARD, "w") as fh:
            fh.write("0")
        subprocess.run([nft, "delete", "table", "inet", GUARD_TABLE], capture_output=True)
        return ["switched IPv4 forwarding back off (no smolvm VM uses it any more)"]
    finally:
        os.close(fd)


def load(nft: str, script: str) -> None:
    """Load ``script``; nft works in the network namespace of the calling thread."""
    proc = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"nft refused the rules: {proc.stderr.strip()}")
