"""Opt-in networking: one TAP per VM (pyroute2), NAT and policy in nftables.

Off by default: a VM has no NIC. With ``network="nat"`` the host

- leases a /30 from a private pool (``net_pool``) that overlaps none of the
  namespace's routes and no other live lease (in the state DB, under its
  write lock, so concurrent starts never share one);
- creates a persistent TAP with pyroute2, gives it the /30's first address,
  and hands QEMU an open descriptor for it;
- loads one nftables table per VM, ``inet smolvm_<vm id>``, which the project
  owns alone: masquerade for the VM's address, and these rules always: no
  traffic to other VMs, none to 169.254.0.0/16 (cloud metadata), none to the
  host's own addresses (only replies to connections the host opened, such as
  its SSH session); optionally an egress allowlist of CIDRs and ports;
- switches IPv4 forwarding on in the namespace only if it was off, and then
  only for its TAPs (a guard table drops forwarding between other
  interfaces), and back off when the last VM's TAP goes;
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
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable

from smolvm_kernel.errors import ConfigError, SmolVMError, ToolNotFound

TAP_PREFIX = "smv"
TABLE_PREFIX = "smolvm_"
METADATA_NET = "169.254.0.0/16"
#: Not reachable from a VM unless an egress_allow entry names them: private
#: networks (the host's LAN, other bridges, a cloud's VPC), shared address
#: space (100.64/10, where one cloud serves its metadata), Azure's wireserver,
#: "this network", multicast and the reserved block.
PRIVATE_NETS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "168.63.129.16/32",
                "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")
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


class NetworkError(SmolVMError):
    """Networking was asked for and cannot be set up here."""


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
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def find_nft() -> str | None:
    """The nft binary (a non-root PATH often lacks /usr/sbin)."""
    return shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)


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


# ---------------------------------------------------------------- nftables

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


# ---------------------------------------------------------------- IPv4 forwarding

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
        _nft(nft, render_guard())
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


def _nft(nft: str, script: str) -> None:
    """Load ``script``; nft works in the network namespace of the calling thread."""
    proc = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"nft refused the rules: {proc.stderr.strip()}")


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
        _nft(nft, render_rules(lease, self.allow, self.dns, self.max_connections, self.connection_rate))
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
