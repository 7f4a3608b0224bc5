"""Opt-in networking: one TAP per VM (pyroute2), NAT and policy in nftables.

Off by default: a VM has no NIC. With ``network="nat"`` the host

- leases a /30 from a private pool (``net_pool``) that overlaps none of the
  namespace's routes and no other live lease (in the state DB, under its
  write lock, so concurrent starts never share one);
- creates a persistent TAP with pyroute2, gives it the /30's first address,
  and hands QEMU an open descriptor for it;
- loads one nftables table per VM, ``inet smolvm_<vm id>``, which the project
  owns alone (masquerade, no traffic to other VMs, cloud metadata or the
  host, optionally an egress allowlist), and switches IPv4 forwarding on in
  the namespace only if it was off, only for its TAPs, and back off when the
  last VM's TAP goes: nftables.py says what exactly;
- records TAP, table and lease in the state DB; teardown and
  ``smolvm-kernel cleanup`` delete exactly those.

``netns`` puts all of it in a named network namespace (``ip netns`` style,
``/run/netns/<name>``) instead of the host's own; the tests use that.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import ipaddress
import os
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable

from smolvm_kernel.errors import ConfigError, NetworkError, ToolNotFound
from smolvm_kernel.host.nftables import (TABLE_PREFIX, TAP_PREFIX, enable_forwarding, find_nft, load,
                                         release_forwarding, render_rules)
from smolvm_kernel.host.procs import status_field

_CAP_NET_ADMIN = 12
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000

_LEASES = """
CREATE TABLE IF NOT EXISTS leases (
    vm_id TEXT PRIMARY KEY,
    netns TEXT NOT NULL,
    subnet TEXT NOT NULL,
    tap TEXT NOT NULL,
    nft_table TEXT NOT NULL,
    created REAL NOT NULL DEFAULT (strftime('%s','now'))
)
"""


@dataclasses.dataclass(frozen=True)
class Lease:
    vm_id: str
    netns: str
    subnet: str
    tap: str
    nft_table: str

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def host_ip(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def guest_ip(self) -> str:
        return str(self.network.network_address + 2)

    @property
    def mac(self) -> str:
        """A stable, locally administered unicast MAC for the guest's NIC."""
        b = bytes.fromhex(self.vm_id[:8].ljust(8, "0"))
        return "52:54:" + ":".join(f"{x:02x}" for x in b)


@dataclasses.dataclass(frozen=True)
class Allow:
    """One egress allowlist entry: ``CIDR`` or ``CIDR:port[,port...]``."""

    net: ipaddress.IPv4Network
    ports: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Allow:
        cidr, _, ports = text.strip().partition(":")
        try:
            net = ipaddress.IPv4Network(cidr, strict=False)
            nums = tuple(int(p) for p in ports.split(",")) if ports else ()
        except ValueError:
            raise ConfigError("egress_allow", text, "give entries like '203.0.113.0/24' or "
                                                    "'203.0.113.7/32:80,443' (IPv4 CIDR, optional TCP/UDP ports)") from None
        if any(not 1 <= p <= 65535 for p in nums):
            raise ConfigError("egress_allow", text, "ports are 1 to 65535")
        return cls(net, nums)


# ---------------------------------------------------------------- privileges and tools

def has_net_admin() -> bool:
    caps = status_field("self", "CapEff")
    return caps is not None and bool(int(caps, 16) >> _CAP_NET_ADMIN & 1)


def check_host(netns: str = "") -> str:
    """The nft binary, or a NetworkError saying exactly what is missing."""
    if not has_net_admin():
        raise NetworkError(
            "network='nat' needs CAP_NET_ADMIN to create the VM's TAP device and its nftables "
            "rules: run the kernel as root, or give its Python CAP_NET_ADMIN (e.g. "
            "`setcap cap_net_admin+ep $(readlink -f .venv/bin/python)`), or use network='none' "
            "(the default, which needs no privilege)")
    nft = find_nft()
    if nft is None:
        raise ToolNotFound("nft", "nftables (apt-get install nftables)")
    if not os.path.exists("/dev/net/tun"):
        raise NetworkError("/dev/net/tun is missing: load the tun module (modprobe tun)")
    if netns and not os.path.exists(f"/run/netns/{netns}"):
        raise NetworkError(f"network namespace {netns!r} does not exist (/run/netns/{netns}); "
                           f"create it (ip netns add {netns}) or set netns=''")
    return nft


# ---------------------------------------------------------------- namespaces

def in_netns(netns: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` with the calling thread in ``netns`` ('' = as is), on a thread of its own.

    setns(2) moves only the calling thread; a short-lived thread keeps the
    caller (often the asyncio loop's thread) where it was.
    """
    if not netns:
        return fn()
    result: dict = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetworkError(f"cannot enter network namespace {netns!r}: {os.strerror(err)}")
        finally:
            os.close(fd)
        result["value"] = fn()

    def guarded() -> None:
        try:
            run()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    t = threading.Thread(target=guarded, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


# ---------------------------------------------------------------- leases

class LeaseBook:
    """IP leases in the state DB (``<state>/vms.db``), safe across processes."""

    def __init__(self, db_path) -> None:
        self.db_path = db_path

    def _db(self):
        from smolvm_kernel.host.db import transaction

        return transaction(self.db_path, _LEASES)

    def allocate(self, vm_id: str, pool: str, netns: str, routes: Callable[[], Iterable[str]]) -> Lease:
        """The first free /30 of ``pool``: not leased, not overlapping any route."""
        pool_net = ipaddress.IPv4Network(pool)
        with self._db() as con:      # one allocator at a time, across processes
            taken = [ipaddress.IPv4Network(r[0]) for r in con.execute("SELECT subnet FROM leases")]
            taken += [ipaddress.IPv4Network(r) for r in routes()]
            for candidate in pool_net.subnets(new_prefix=30):
                if any(candidate.overlaps(t) for t in taken):
                    continue
                lease = Lease(vm_id, netns, str(candidate), TAP_PREFIX + vm_id[:12], TABLE_PREFIX + vm_id)
                con.execute("INSERT INTO leases (vm_id, netns, subnet, tap, nft_table) VALUES (?,?,?,?,?)",
                            (lease.vm_id, lease.netns, lease.subnet, lease.tap, lease.nft_table))
                return lease
        raise NetworkError(f"no free /30 left in net_pool {pool} (leases and this host's routes use "
                           f"them all); give a larger or another private pool")

    def release(self, vm_id: str) -> None:
        with self._db() as con:
            con.execute("DELETE FROM leases WHERE vm_id=?", (vm_id,))

    def all(self) -> list[Lease]:
        with self._db() as con:
            rows = con.execute("SELECT vm_id, netns, subnet, tap, nft_table FROM leases").fetchall()
        return [Lease(*r) for r in rows]


def host_routes() -> list[str]:
    """IPv4 destinations routed in the current namespace (default route excluded)."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for r in ipr.get_routes(family=2):
            dst, plen = r.get_attr("RTA_DST"), r["dst_len"]
            if dst and plen:
                out.append(str(ipaddress.IPv4Network(f"{dst}/{plen}", strict=False)))
        for a in ipr.get_addr(family=2):
            out.append(str(ipaddress.IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}",
                                                 strict=False)))
    return out


# ---------------------------------------------------------------- one VM's network

class VMNetwork:
    """Set up and tear down one VM's TAP, address, rules and lease."""

    def __init__(self, book: LeaseBook, vm_id: str, *, pool: str, netns: str = "",
                 allow: Iterable[str] = (), dns: Iterable[str] = (),
                 max_connections: int = 512, connection_rate: int = 100) -> None:
        self.book, self.vm_id, self.pool, self.netns = book, vm_id, pool, netns
        self.max_connections, self.connection_rate = max_connections, connection_rate
        self.allow = [Allow.parse(a) for a in allow]
        self.dns, self.dns_notes = guest_name_servers(dns, self.allow)
        self.lease: Lease | None = None

    def setup(self, open_fd: bool = True) -> int | None:
        """Lease, TAP, rules; with ``open_fd``, an open TAP descriptor for the VMM
        (the caller closes it; Firecracker opens the TAP by name instead)."""
        nft = check_host(self.netns)
        self.lease = self.book.allocate(self.vm_id, self.pool, self.netns,
                                        lambda: in_netns(self.netns, host_routes))
        try:
            return in_netns(self.netns, lambda: self._setup_in_ns(nft, open_fd))
        except BaseException:
            self.teardown()
            raise

    def _setup_in_ns(self, nft: str, open_fd: bool) -> int | None:
        from pyroute2 import IPRoute

        lease = self.lease
        with IPRoute() as ipr:
            ipr.link("add", ifname=lease.tap, kind="tuntap", mode="tap")
            idx = ipr.link_lookup(ifname=lease.tap)[0]
            ipr.addr("add", index=idx, address=lease.host_ip, prefixlen=30)
            ipr.link("set", index=idx, state="up")
        enable_forwarding(nft, lease.netns)
        load(nft, render_rules(lease, self.allow, self.dns, self.max_connections, self.connection_rate))
        if not open_fd:
            return None
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", lease.tap.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
        except OSError:
            os.close(fd)
            raise
        return fd

    def guest_config(self) -> dict:
        lease = self.lease
        return {"device": "eth0", "address": lease.guest_ip, "prefix": 30, "gateway": lease.host_ip,
                "dns": self.dns}

    def teardown(self) -> list[str]:
        lease = self.lease or next((x for x in self.book.all() if x.vm_id == self.vm_id), None)
        if lease is None:
            return []
        done = remove_lease_objects(lease)
        self.book.release(lease.vm_id)
        self.lease = None
        return done


def remove_lease_objects(lease: Lease) -> list[str]:
    """Delete a lease's nft table and TAP (whichever still exist)."""
    done: list[str] = []
    if lease.netns and not os.path.exists(f"/run/netns/{lease.netns}"):
        return [f"namespace {lease.netns} is gone (and with it TAP {lease.tap} and table {lease.nft_table})"]
    nft = find_nft() or "nft"

    def work() -> None:
        from pyroute2 import IPRoute

        proc = subprocess.run([nft, "delete", "table", "inet", lease.nft_table], capture_output=True, text=True)
        if proc.returncode == 0:
            done.append(f"deleted nftables table inet {lease.nft_table}")
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=lease.tap)
            if idx:
                ipr.link("del", index=idx[0])
                done.append(f"deleted TAP {lease.tap}")
        done.extend(release_forwarding(nft, lease.netns))

    # nft runs in the namespace of the thread that starts it.
    in_netns(lease.netns, work)
    return done


def host_name_servers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The host's name servers that a guest can reach (IPv4, not loopback ones)."""
    servers = []
    try:
        with open(resolv_conf) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        ip = ipaddress.ip_address(parts[1])
                    except ValueError:
                        continue
                    if ip.version == 4 and not ip.is_loopback:
                        servers.append(str(ip))
    except OSError:
        pass
    return servers


def guest_name_servers(entries: Iterable[str], allow: Iterable[Allow] = (),
                       host: Callable[[], list[str]] = host_name_servers) -> tuple[list[str], list[str]]:
    """The name servers a guest gets from the ``dns`` setting, and notes on what was left out.

    'host' stands for the host's own servers; 'none' (or no entry) for none.
    With an allowlist, only servers it lets through on port 53 are kept: a
    server the rules drop would make every lookup wait for its time-out.
    """
    allow = list(allow)
    servers: list[str] = []
    notes: list[str] = []
    for entry in entries:
        if entry == "none":
            continue
        if entry == "host":
            found = host()
            if not found:
                notes.append("the host has no name server a VM can reach (none, or only loopback "
                             "ones); set SandboxConfig.dns to give the VM one")
            servers += [s for s in found if s not in servers]
        elif entry not in servers:
            servers.append(entry)
    if allow:
        kept = [s for s in servers if any(ipaddress.IPv4Address(s) in a.net and (not a.ports or 53 in a.ports)
                                          for a in allow)]
        for s in servers:
            if s not in kept:
                notes.append(f"name server {s} is left out: egress_allow does not let {s}:53 through "
                             f"(add '{s}/32:53' to allow it)")
        servers = kept
    return servers, notes


def cleanup_leases(db_path, is_live: Callable[[str], bool]) -> list[str]:
    """Remove the TAP, rules and lease of every VM that is no longer live.

    Liveness is asked per lease, after the leases are read: a VM's record is
    written before its lease, so a lease made while this runs is never
    mistaken for a leftover (a precomputed set of live VMs would be).
    """
    book = LeaseBook(db_path)
    done: list[str] = []
    for lease in book.all():
        if is_live(lease.vm_id):
            continue
        done += remove_lease_objects(lease)
        book.release(lease.vm_id)
        done.append(f"released {lease.subnet} of VM {lease.vm_id}")
    return done
