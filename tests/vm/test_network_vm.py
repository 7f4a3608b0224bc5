"""network='nat' and transport='ssh' on real VMs, inside namespaces this module makes.

No packet leaves the namespaces created here. Layout::

    namespace N (the VMs' side, plays the host)      namespace S (the outside)
      TAP smv<vm> 10.213.x.1/30 <-> guest x.2          vB 198.18.0.2/24  server :8080
      vA 198.18.0.1/24 (host's own; server :9000)  <->    198.18.0.3/24  server :8080, :8090 (holds)
      server 0.0.0.0:9001, default via 198.18.0.2        169.254.169.254  server :80
                                                         blackhole 198.18.1.53 (a name server
                                                         that never answers)

Each refusal is checked against a control that shows the path exists: the
address answers from N itself or from a VM without an allowlist.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from smolvm_kernel.host.net import has_net_admin, in_netns

pytestmark = pytest.mark.skipif(not has_net_admin(), reason="needs CAP_NET_ADMIN (root) for netns/TAP/nft")

ALLOWED = ("198.18.0.2", 8080)
OTHER = ("198.18.0.3", 8080)
METADATA = ("169.254.169.254", 80)
HOST_OWN = ("198.18.0.1", 9000)
#: The VMs' name server: routed into namespace S and silently dropped there,
#: like a host resolver that a namespace cannot reach. No DNS answers here.
SILENT_DNS = "198.18.1.53"
#: One server in each range a VM may not reach unless allowlisted, on addresses
#: of namespace S (traffic to them never leaves the namespaces made here).
PRIVATE = [("10.99.0.1", 8080), ("172.16.5.1", 8080), ("192.168.77.1", 8080), ("100.64.0.1", 8080)]
#: A server in S that keeps every connection open (for the connection cap).
HOLD = ("198.18.0.3", 8090)
#: The VM "ssh_b" may have this many connections open; "allow" may open this many a second.
MAX_CONNECTIONS = 12
RATE = 5


def _serve(netns: str, addr: str, port: int, stop: threading.Event, hold: bool = False) -> None:
    sock = in_netns(netns, lambda: socket.create_server((addr, port), reuse_port=False, backlog=128))
    sock.settimeout(0.5)
    held = []

    def loop():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.sendall(f"hello from {addr}:{port}\n".encode())
            if hold:
                held.append(conn)
            else:
                conn.close()
        for conn in held:
            conn.close()
        sock.close()
    threading.Thread(target=loop, daemon=True).start()


@pytest.fixture(scope="module")
def lab(image):
    from pyroute2 import IPRoute, netns

    tag = secrets.token_hex(3)
    n, s = f"smvt{tag}", f"smvs{tag}"
    netns.create(n)
    netns.create(s)
    stop = threading.Event()
    try:
        def outer_side():
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.link("add", ifname="vA", kind="veth", peer="vB")
                ipr.link("set", index=ipr.link_lookup(ifname="vB")[0], net_ns_fd=s)
                va = ipr.link_lookup(ifname="vA")[0]
                ipr.addr("add", index=va, address="198.18.0.1", prefixlen=24)
                ipr.link("set", index=va, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway="198.18.0.2")

        def server_side():
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                vb = ipr.link_lookup(ifname="vB")[0]
                for addr, plen in (("198.18.0.2", 24), ("198.18.0.3", 24), ("169.254.169.254", 16),
                                   *((a, 24) for a, _ in PRIVATE)):
                    ipr.addr("add", index=vb, address=addr, prefixlen=plen)
                ipr.link("set", index=vb, state="up")
                ipr.route("add", dst=f"{SILENT_DNS}/32", type="blackhole")

        in_netns(n, outer_side)
        in_netns(s, server_side)
        for addr, port in (ALLOWED, OTHER, METADATA, *PRIVATE):
            _serve(s, addr, port, stop)
        _serve(s, *HOLD, stop, hold=True)
        _serve(n, *HOST_OWN, stop)
        _serve(n, "0.0.0.0", 9001, stop)
        yield n, s
    finally:
        stop.set()
        for name in (n, s):
            try:
                netns.remove(name)
            except OSError:
                pass


def _vm(lab, **kw):
    from smolvm_kernel.vm.sandbox import Sandbox

    sb = Sandbox(network="nat", netns=lab[0], backend="qemu", dns=[SILENT_DNS], **kw)
    return sb


@pytest.fixture(scope="module")
def vms(lab):
    """Three VMs booted at once: one serial with an allowlist, two over SSH without."""
    # Cold boots (snapshot="off"): a background snapshot build would share the
    # CPU with the rate and connection tests (NIC snapshots: see below).
    boxes = {"allow": _vm(lab, egress_allow=[f"{ALLOWED[0]}/32:{ALLOWED[1]}"], net_connection_rate=RATE,
                          snapshot="off"),
             "ssh_a": _vm(lab, transport="ssh"),
             "ssh_b": _vm(lab, transport="ssh", net_max_connections=MAX_CONNECTIONS)}
    errors = []
    threads = [threading.Thread(target=lambda b=b: _start(b, errors)) for b in boxes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield boxes
    finally:
        for b in boxes.values():
            b.stop()


def _start(sb, errors):
    try:
        sb.start()
    except Exception as exc:
        errors.append(exc)


def probe(sb, *targets, timeout=2.0) -> list[str]:
    """From the guest: 'OK <greeting>' or 'BLOCKED <error>' per (addr, port)."""
    code = textwrap.dedent(f"""
        import socket
        for addr, port in {list(targets)!r}:
            try:
                with socket.create_connection((addr, port), timeout={timeout}) as s:
                    print("OK", s.recv(100).decode().strip())
            except OSError as e:
                print("BLOCKED", type(e).__name__)
    """)
    out = "".join(o.text for o in sb.execute(code) if o.type == "stream")
    return out.strip().splitlines()


def from_namespace(netns, addr, port) -> bool:
    def go():
        with socket.create_connection((addr, port), timeout=2) as s:
            return s.recv(100)
    try:
        return bool(in_netns(netns, go))
    except OSError:
        return False


def test_guest_has_its_address_and_transport(vms):
    for name, sb in vms.items():
        st = sb.stats()
        assert st["network"] == "nat" and st["guest_ip"].startswith("10.213.")
        assert st["transport"] == ("serial" if name == "allow" else "ssh")
    ips = {sb.stats()["guest_ip"] for sb in vms.values()}
    assert len(ips) == 3


def test_names_resolve_locally_whatever_dns_does(vms):
    """The VMs became ready although their name server never answers (ipykernel
    looks its host name up at start); the guest's own name and localhost come
    from /etc/hosts, and resolv.conf holds exactly the configured servers."""
    code = ("import socket; print(socket.gethostbyname(socket.gethostname()), "
            "socket.gethostbyname('localhost')); print(open('/etc/resolv.conf').read())")
    for name, sb in vms.items():
        out = "".join(o.text for o in sb.execute(code) if o.type == "stream").splitlines()
        assert out[0] == "127.0.1.1 127.0.0.1", (name, out)
        servers = [line.split()[1] for line in out if line.startswith("nameserver")]
        # The allowlist does not let port 53 through to SILENT_DNS: left out.
        assert servers == ([] if name == "allow" else [SILENT_DNS]), (name, out)


def test_allowlist_lets_through_only_what_it_names(vms, lab):
    lease_host = vms["allow"].machine.net.lease.host_ip
    got = probe(vms["allow"], ALLOWED, OTHER, METADATA, HOST_OWN, (lease_host, 9001))
    assert got[0] == f"OK hello from {ALLOWED[0]}:{ALLOWED[1]}"
    assert all(line.startswith("BLOCKED") for line in got[1:]), got


def test_without_allowlist_metadata_and_host_stay_blocked(vms, lab):
    n, _ = lab
    lease_host = vms["ssh_a"].machine.net.lease.host_ip
    got = probe(vms["ssh_a"], OTHER, METADATA, HOST_OWN, (lease_host, 9001))
    assert got[0].startswith("OK hello from 198.18.0.3"), got      # the route exists ...
    assert all(line.startswith("BLOCKED") for line in got[1:]), got
    # ... and so do the blocked ones: they answer from the namespace itself.
    assert from_namespace(n, *METADATA) and from_namespace(n, *HOST_OWN)


def test_private_ranges_are_closed_to_a_vm(vms, lab):
    n, _ = lab
    got = probe(vms["ssh_a"], OTHER, *PRIVATE)
    assert got[0].startswith("OK hello from 198.18.0.3"), got      # the VM has a way out ...
    assert all(line.startswith("BLOCKED") for line in got[1:]), got
    # ... and each private server answers from the namespace: the rules stop the VM, not the routes.
    assert all(from_namespace(n, *addr) for addr in PRIVATE)


def test_vm_to_vm_is_refused(vms, lab):
    n, _ = lab
    listen = ("import socket, threading\n"
              "srv = socket.create_server(('0.0.0.0', 7000))\n"
              "def serve():\n"
              "    while True:\n"
              "        c, _ = srv.accept(); c.sendall(b'vm b\\n'); c.close()\n"
              "threading.Thread(target=serve, daemon=True).start()\n")
    list(vms["ssh_b"].execute(listen))
    b_ip = vms["ssh_b"].stats()["guest_ip"]
    assert from_namespace(n, b_ip, 7000)                   # it listens ...
    assert probe(vms["ssh_a"], (b_ip, 7000))[0].startswith("BLOCKED")
    assert probe(vms["allow"], (b_ip, 7000))[0].startswith("BLOCKED")


def test_a_vm_has_at_most_its_connections_open_at_once(vms, lab):
    """20 connections at once to a server that keeps them: the VM gets its cap
    (net_max_connections) and no more; closed, they free their places."""
    code = textwrap.dedent(f"""
        import socket, concurrent.futures
        def one(_):
            s = socket.socket()
            s.settimeout(3)
            try:
                s.connect({HOLD!r})
                return s
            except OSError:
                s.close()
        with concurrent.futures.ThreadPoolExecutor(20) as ex:
            socks = [s for s in ex.map(one, range(20)) if s]
        print(len(socks))
        for s in socks:
            s.close()
    """)
    out = "".join(o.text for o in vms["ssh_b"].execute(code) if o.type == "stream")
    print(f"connections open at once: {out.strip()} of 20 tried, cap {MAX_CONNECTIONS}")
    assert int(out) == MAX_CONNECTIONS
    # closed, they no longer count
    assert probe(vms["ssh_b"], HOLD, OTHER) == [f"OK hello from {HOLD[0]}:{HOLD[1]}",
                                                 f"OK hello from {OTHER[0]}:{OTHER[1]}"]
    # and another VM (its own table, the default cap) never had one of them
    assert probe(vms["ssh_a"], HOLD)[0].startswith("OK")


def test_a_vm_opens_new_connections_at_most_at_its_rate(vms, lab):
    """Connections as fast as the guest can open them, for 3 s, to a server it
    may reach: about net_connection_rate a second get through, the rest are dropped."""
    code = textwrap.dedent(f"""
        import socket, time
        t, ok, n = time.monotonic(), 0, 0
        while time.monotonic() - t < 3:
            n += 1
            try:
                socket.create_connection({ALLOWED!r}, timeout=0.2).close()
                ok += 1
            except OSError:
                pass
        print(ok, n, round(time.monotonic() - t, 2))
    """)
    ok, tried, took = "".join(o.text for o in vms["allow"].execute(code) if o.type == "stream").split()
    ok, tried, took = int(ok), int(tried), float(took)
    print(f"new connections in {took} s: {ok} of {tried} got through (rate {RATE}/s, burst {RATE})")
    assert ok >= RATE                                   # the burst gets through
    assert ok <= RATE + RATE * took + 2 and tried > ok


def test_ssh_host_key_is_pinned_and_per_vm(vms, lab):
    import dataclasses

    from smolvm_kernel.channel import ssh

    a, b = vms["ssh_a"], vms["ssh_b"]
    assert a.machine.ssh_keys.host_public != b.machine.ssh_keys.host_public
    assert a.machine.ssh_keys.client_public != b.machine.ssh_keys.client_public
    # A's server with B's pinned key: refused before any login.
    tampered = dataclasses.replace(a.machine.ssh_keys, host_public=b.machine.ssh_keys.host_public)
    with pytest.raises(ssh.HostKeyMismatch, match="refusing to connect"):
        ssh.connect(a.stats()["guest_ip"], tampered, netns=lab[0], timeout=20)
    # B's client key is not accepted by A either.
    wrong_client = dataclasses.replace(a.machine.ssh_keys, client_private=b.machine.ssh_keys.client_private)
    with pytest.raises(ConnectionError):
        ssh.connect(a.stats()["guest_ip"], wrong_client, netns=lab[0], timeout=5)


def test_password_login_is_off(vms, lab):
    import paramiko

    ip = vms["ssh_a"].stats()["guest_ip"]
    sock = in_netns(lab[0], lambda: socket.create_connection((ip, 22), timeout=5))
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as err:
            t.auth_password("root", "root")
        assert "password" not in err.value.allowed_types
    finally:
        t.close()


def test_kernel_work_over_ssh(vms):
    sb = vms["ssh_a"]
    outs = list(sb.execute("import sys; print('x' * 100000); 6 * 7"))
    assert sum(len(o.text) for o in outs if o.type == "stream") >= 100000
    assert any(o.type == "execute_result" and "42" in o.text for o in outs)
    sb.put_file(b"over ssh", "f.txt")
    assert sb.get_file("f.txt") == b"over ssh"


def test_nic_vms_start_from_a_ready_snapshot_each_with_its_own_address(lab):
    """network="nat" with the serial transport: the shape's snapshot has a NIC
    (its template's on a hub port that leads nowhere); each fork gets its own
    TAP, and its lease's address and MAC over the channel after the restore."""
    allow = [f"{ALLOWED[0]}/32:{ALLOWED[1]}"]
    a = _vm(lab, egress_allow=allow, snapshot="wait")
    b = _vm(lab, egress_allow=allow, snapshot="wait")
    try:
        a.start()
        b.start()
        assert (a.started_from, b.started_from) == ("snapshot", "snapshot")
        seen = []
        for sb in (a, b):
            lease = sb.machine.net.lease
            code = ("import subprocess\nprint(open('/sys/class/net/eth0/address').read().strip())\n"
                    "print(subprocess.run(['ip', '-4', '-o', 'addr', 'show', 'eth0'], capture_output=True, "
                    "text=True).stdout.split()[3])")
            mac, addr = "".join(o.text for o in sb.execute(code) if o.type == "stream").split()
            assert (mac, addr) == (lease.mac, f"{lease.guest_ip}/30")
            got = probe(sb, ALLOWED, OTHER)
            assert got[0] == f"OK hello from {ALLOWED[0]}:{ALLOWED[1]}" and got[1].startswith("BLOCKED"), got
            seen.append((mac, addr))
        assert seen[0] != seen[1]
    finally:
        a.stop()
        b.stop()


def _ns_has(netns, tap, table) -> tuple[bool, bool]:
    def look():
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            has_tap = bool(ipr.link_lookup(ifname=tap))
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        return has_tap, table in tables
    return in_netns(netns, look)


def test_stop_removes_tap_rules_and_lease(lab):
    from smolvm_kernel.host.net import LeaseBook

    sb = _vm(lab)
    sb.start()
    lease = sb.machine.net.lease
    assert _ns_has(lab[0], lease.tap, lease.nft_table) == (True, True)
    sb.stop()
    assert _ns_has(lab[0], lease.tap, lease.nft_table) == (False, False)
    assert lease.vm_id not in {x.vm_id for x in LeaseBook(sb._registry.db_path).all()}


OWNER = """
import sys, time
from smolvm_kernel.vm.sandbox import Sandbox
sb = Sandbox(network="nat", netns=sys.argv[1], backend="qemu", dns=[])
sb.start()
lease = sb.machine.net.lease
print("READY", lease.vm_id, lease.tap, lease.nft_table, flush=True)
time.sleep(600)
"""


def test_cleanup_after_the_owner_is_killed(lab):
    from smolvm_kernel.host.net import LeaseBook
    from smolvm_kernel.host.registry import Registry

    proc = subprocess.Popen([sys.executable, "-c", OWNER, lab[0]], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "READY", line
        vm_id, tap, table = line[1:]
        assert _ns_has(lab[0], tap, table) == (True, True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    registry = Registry()
    done = "\n".join(registry.cleanup())
    assert f"deleted TAP {tap}" in done and f"deleted nftables table inet {table}" in done
    assert f"of VM {vm_id}" in done
    assert _ns_has(lab[0], tap, table) == (False, False)
    assert vm_id not in {x.vm_id for x in LeaseBook(registry.db_path).all()}
    again = registry.cleanup()
    assert not any(vm_id in x or tap in x for x in again), again
