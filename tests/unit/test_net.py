"""Networking without VMs: leases, nftables rendering, allowlist parsing, transport choice."""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import shutil
import struct
import subprocess

import pytest

from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import ConfigError, NetworkError
from smolvm_kernel.host.net import Allow, Lease, LeaseBook, has_net_admin
from smolvm_kernel.host.nftables import render_rules


@pytest.fixture
def book(tmp_path):
    return LeaseBook(tmp_path / "vms.db")


def test_leases_are_distinct_and_skip_routes(book):
    routes = ["10.213.0.0/29", "10.213.0.12/32"]   # covers .0/30, .4/30 and .12/30
    got = [book.allocate(f"vm{i:010d}", "10.213.0.0/27", "", lambda: routes) for i in range(3)]
    subnets = [g.subnet for g in got]
    assert subnets == ["10.213.0.8/30", "10.213.0.16/30", "10.213.0.20/30"]
    assert got[0].host_ip == "10.213.0.9" and got[0].guest_ip == "10.213.0.10"
    assert len({g.tap for g in got}) == 3 and all(len(g.tap) <= 15 for g in got)


def test_a_released_lease_is_reused_but_a_live_one_never(book):
    a = book.allocate("a" * 12, "10.213.0.0/29", "", list)
    b = book.allocate("b" * 12, "10.213.0.0/29", "", list)
    with pytest.raises(NetworkError, match="no free /30 left"):
        book.allocate("c" * 12, "10.213.0.0/29", "", list)
    book.release(a.vm_id)
    c = book.allocate("c" * 12, "10.213.0.0/29", "", list)
    assert c.subnet == a.subnet and c.subnet != b.subnet


def _allocate_many(db_path, prefix, n, out):
    book = LeaseBook(db_path)
    for i in range(n):
        out.put(book.allocate(f"{prefix}{i:08d}", "10.213.0.0/24", "", list).subnet)


def test_allocation_is_safe_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(tmp_path / "vms.db", f"p{k}", 12, out)) for k in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in range(48)]
    for p in procs:
        p.join(30)
    assert len(got) == len(set(got)) == 48


def test_lease_mac_is_locally_administered_unicast():
    mac = Lease("0123456789ab", "", "10.213.0.0/30", "smv0123456789a", "smolvm_x").mac
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b1 and len(mac.split(":")) == 6


def _lease():
    return Lease("0123456789ab", "", "10.213.0.4/30", "smv0123456789a", "smolvm_0123456789ab")


def test_rules_always_block_metadata_other_vms_and_the_host():
    rules = render_rules(_lease())
    assert "table inet smolvm_0123456789ab {" in rules
    assert 'iifname "smv0123456789a" ip daddr 169.254.0.0/16 drop' in rules
    assert 'iifname "smv0123456789a" oifname "smv*" drop' in rules
    assert 'iifname "smv0123456789a" ip saddr != 10.213.0.6 drop' in rules     # no spoofing
    # input: the host's own addresses only see replies to what the host opened
    inp = rules[rules.index("chain input"):rules.index("chain postrouting")]
    assert inp.index("ct state established,related accept") < inp.index('iifname "smv0123456789a" drop')
    assert 'ip saddr 10.213.0.6 oifname != "smv0123456789a" masquerade' in rules
    # without an allowlist everything else may leave
    assert 'iifname "smv0123456789a" accept' in rules


def test_connection_limits_come_before_any_accept():
    fwd = render_rules(_lease(), [Allow.parse("198.18.0.2/32")], dns=["10.0.0.2"],
                       max_connections=64, connection_rate=20)
    count = 'iifname "smv0123456789a" ct state new ct count over 64 drop'
    rate = 'iifname "smv0123456789a" ct state new limit rate over 20/second burst 20 packets drop'
    assert count in fwd and rate in fwd
    lines = [ln.strip() for ln in fwd.splitlines()]
    first_accept = min(i for i, ln in enumerate(lines) if ln.startswith("iifname") and ln.endswith("accept"))
    assert lines.index(count) < first_accept and lines.index(rate) < first_accept


@pytest.mark.parametrize("name", ["net_max_connections", "net_connection_rate"])
def test_connection_limits_out_of_range_name_the_fix(name):
    with pytest.raises(Exception, match=f"{name}=0 is out of range; use 1 to 65536"):
        SandboxConfig(**{name: 0})


@pytest.mark.skipif(shutil.which("nft") is None or not has_net_admin(), reason="needs nft and CAP_NET_ADMIN")
def test_forwarding_goes_on_for_smolvm_taps_only_and_off_with_the_last():
    """In a namespace of this test's own: forwarding starts off; a VM's set-up
    switches it on with the guard table; it stays on while any smolvm TAP is
    left and goes off, guard and all, with the last."""
    import secrets

    from pyroute2 import IPRoute, netns

    from smolvm_kernel.host.net import in_netns
    from smolvm_kernel.host.nftables import GUARD_TABLE, enable_forwarding, release_forwarding

    name = f"smvu{secrets.token_hex(3)}"
    nft = shutil.which("nft")
    netns.create(name)

    def forwarding() -> str:
        with open("/proc/sys/net/ipv4/ip_forward") as fh:
            return fh.read().strip()

    def guard() -> bool:
        return subprocess.run([nft, "list", "table", "inet", GUARD_TABLE], capture_output=True).returncode == 0

    def scenario():
        seen = [forwarding()]
        with IPRoute() as ipr:
            for tap in ("smvaaaa", "smvbbbb"):
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
            enable_forwarding(nft, name)
            enable_forwarding(nft, name)              # a second VM: nothing more
            seen += [forwarding(), guard()]
            ipr.link("del", index=ipr.link_lookup(ifname="smvaaaa")[0])
            seen += [release_forwarding(nft, name), forwarding()]
            ipr.link("del", index=ipr.link_lookup(ifname="smvbbbb")[0])
            seen += [bool(release_forwarding(nft, name)), forwarding(), guard()]
        return seen

    try:
        assert in_netns(name, scenario) == ["0", "1", True, [], "1", True, "0", False]
    finally:
        netns.remove(name)


@pytest.mark.skipif(shutil.which("nft") is None or not has_net_admin(), reason="needs nft and CAP_NET_ADMIN")
def test_a_namespace_that_forwarded_already_is_left_as_it_was():
    import secrets

    from pyroute2 import netns

    from smolvm_kernel.host.net import in_netns
    from smolvm_kernel.host.nftables import GUARD_TABLE, enable_forwarding, release_forwarding

    name = f"smvu{secrets.token_hex(3)}"
    nft = shutil.which("nft")
    netns.create(name)

    def scenario():
        with open("/proc/sys/net/ipv4/ip_forward", "w") as fh:
            fh.write("1")
        enable_forwarding(nft, name)
        has_guard = subprocess.run([nft, "list", "table", "inet", GUARD_TABLE], capture_output=True).returncode == 0
        released = release_forwarding(nft, name)
        with open("/proc/sys/net/ipv4/ip_forward") as fh:
            return has_guard, released, fh.read().strip()

    try:
        assert in_netns(name, scenario) == (False, [], "1")
    finally:
        netns.remove(name)


def test_private_ranges_are_closed_unless_allowlisted_and_name_servers_open_on_53():
    fwd = render_rules(_lease(), dns=["10.0.0.2"])
    private = 'ip daddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, 168.63.129.16/32'
    assert private in fwd
    dns_rule = 'ip daddr { 10.0.0.2 } meta l4proto { tcp, udp } th dport 53 accept'
    # the name server (a private address here) is reachable on port 53 only, before the private drop
    assert fwd.index(dns_rule) < fwd.index(private) < fwd.index('iifname "smv0123456789a" accept')
    assert fwd.index("169.254.0.0/16 drop") < fwd.index(dns_rule)      # metadata stays closed
    # an allowlist entry for a private address opens it (all else is closed then anyway)
    allowed = render_rules(_lease(), [Allow.parse("10.1.2.3/32:443")])
    assert "ip daddr 10.1.2.3/32 meta l4proto { tcp, udp } th dport { 443 } accept" in allowed
    assert private not in allowed


def test_allowlist_rules_end_in_a_drop():
    rules = render_rules(_lease(), [Allow.parse("198.18.0.2/32:8080,8443"), Allow.parse("203.0.113.0/24")])
    fwd = rules[rules.index("chain forward"):rules.index("chain input")]
    assert "ip daddr 198.18.0.2/32 meta l4proto { tcp, udp } th dport { 8080, 8443 } accept" in fwd
    assert "ip daddr 203.0.113.0/24 accept" in fwd
    # the always-on drops come before any accept; a drop closes the list
    assert fwd.index("169.254.0.0/16 drop") < fwd.index("198.18.0.2/32")
    lines = [ln.strip() for ln in fwd.splitlines()]
    last_iif = [ln for ln in lines if ln.startswith('iifname "smv0123456789a"')][-1]
    assert last_iif == 'iifname "smv0123456789a" drop'
    assert 'iifname "smv0123456789a" accept' not in fwd


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_rendered_rules_parse_with_nft(tmp_path):
    # --check parses and resolves the ruleset without loading it.
    from smolvm_kernel.host.nftables import render_guard

    for allow, dns in (([], []), ([Allow.parse("198.18.0.2/32:8080")], []), ([], ["10.0.0.2", "192.0.2.53"])):
        proc = subprocess.run(["nft", "--check", "-f", "-"], input=render_rules(_lease(), allow, dns),
                              capture_output=True, text=True)
        if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
            pytest.skip("nft --check needs CAP_NET_ADMIN")
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["nft", "--check", "-f", "-"], input=render_guard(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("text", ["10.0.0.0/33", "host.example", "10.0.0.0/8:0", "10.0.0.0/8:70000",
                                  "10.0.0.0/8:http"])
def test_bad_allowlist_entries_name_the_fix(text):
    with pytest.raises(ConfigError, match="egress_allow"):
        Allow.parse(text)
    with pytest.raises(Exception, match="egress_allow"):
        SandboxConfig(egress_allow=[text])


def test_ssh_without_a_nic_is_refused_with_the_reason():
    cfg = SandboxConfig(transport="ssh")
    assert "needs network='nat'" in cfg.combination_problems()[0]
    with pytest.raises(ConfigError, match="needs network='nat'"):
        cfg.changed(vcpus=1)
    assert SandboxConfig(transport="ssh", network="nat").combination_problems() == []


@pytest.mark.parametrize("pool", ["8.8.8.0/24", "10.0.0.0/31", "nonsense"])
def test_pool_must_be_a_private_range(pool):
    with pytest.raises(Exception, match="net_pool"):
        SandboxConfig(net_pool=pool)


def test_transport_choice(monkeypatch):
    from smolvm_kernel.vm import boot as sandbox

    monkeypatch.setattr(sandbox, "qemu_vsock_available", lambda: False)
    assert sandbox.pick_transport(SandboxConfig(), "qemu") == "serial"
    assert sandbox.pick_transport(SandboxConfig(), "firecracker") == "vsock"
    with pytest.raises(ConfigError, match="vhost-vsock"):
        sandbox.pick_transport(SandboxConfig(transport="vsock"), "qemu")
    with pytest.raises(ConfigError, match="no virtio-serial"):
        sandbox.pick_transport(SandboxConfig(transport="serial"), "firecracker")
    monkeypatch.setattr(sandbox, "qemu_vsock_available", lambda: True)
    assert sandbox.pick_transport(SandboxConfig(), "qemu") == "vsock"
    assert sandbox.pick_transport(SandboxConfig(transport="ssh", network="nat"), "qemu") == "ssh"


def test_vsock_argv_and_cmdline(tmp_path):
    from smolvm_kernel.backends.base import VMSpec
    from smolvm_kernel.backends.qemu import qemu_argv
    from smolvm_kernel.images import Image

    image = Image(profile="base", key="0" * 64, directory=tmp_path, kernel_release="x")
    spec = VMSpec(vm_id="v", run_dir=tmp_path, image=image, transport="vsock", vsock_cid=1234)
    argv = qemu_argv(spec, "qemu-system-x86_64", sandboxed=False)
    assert argv[argv.index("vhost-vsock-device,guest-cid=1234") - 1] == "-device"
    assert "smolvm.channel=vsock" in argv[argv.index("-append") + 1].split()
    spec = VMSpec(vm_id="v", run_dir=tmp_path, image=image, tap_fd=7, mac="52:54:00:00:00:01",
                  seed=tmp_path / "seed.img")
    argv = qemu_argv(spec, "qemu-system-x86_64", sandboxed=False)
    assert "tap,id=net0,fd=7,vhost=off" in argv
    assert "virtio-blk-device,drive=seed,serial=smolvm-seed" in argv
    assert "smolvm.channel" not in argv[argv.index("-append") + 1]


def test_seed_disk_format(tmp_path):
    from smolvm_guest import seed as guest_seed
    from smolvm_kernel.backends.base import write_seed

    path = tmp_path / "seed.img"
    write_seed(path, {"smolvm_seed": 1, "net": {"address": "10.213.0.2"}})
    data = path.read_bytes()
    assert len(data) % 4096 == 0 and oct(path.stat().st_mode)[-3:] == "600"
    (length,) = struct.unpack("!I", data[:4])
    assert json.loads(data[4:4 + length])["net"]["address"] == "10.213.0.2"
    assert guest_seed._read(str(path))["net"]["address"] == "10.213.0.2"
    other = tmp_path / "squashfs.img"
    other.write_bytes(b"hsqs" + b"\0" * 4092)           # the base image is never taken for a seed
    assert guest_seed._read(str(other)) is None


def test_ssh_keys_are_fresh_and_never_printed():
    from smolvm_kernel.channel.ssh import SSHKeys, fingerprint

    a, b = SSHKeys.generate(), SSHKeys.generate()
    assert a.host_public != b.host_public and a.client_public != b.client_public
    assert a.host_public.startswith("ssh-ed25519 ") and "PRIVATE KEY" in a.host_private
    assert "PRIVATE" not in repr(a) and fingerprint(a.host_public) in repr(a)
    seed = a.seed()
    assert seed["authorized_key"] == a.client_public and a.client_private not in json.dumps(seed)


def test_no_net_admin_message_says_what_is_needed(monkeypatch):
    from smolvm_kernel.host import net

    monkeypatch.setattr(net, "has_net_admin", lambda: False)
    with pytest.raises(NetworkError) as err:
        net.check_host()
    assert "CAP_NET_ADMIN" in str(err.value) and "network='none'" in str(err.value)


def test_pool_subnets_are_in_the_pool(book):
    lease = book.allocate("d" * 12, "192.168.77.0/28", "", list)
    assert ipaddress.IPv4Network(lease.subnet).subnet_of(ipaddress.IPv4Network("192.168.77.0/28"))


def test_cleanup_keeps_a_lease_made_while_it_runs(tmp_path, monkeypatch):
    # The race a precomputed live set had: a VM's record and lease both appear
    # after cleanup looked at the records but before it read the leases.
    from smolvm_kernel.host import net
    from smolvm_kernel.host.registry import Registry, VMRecord

    registry = Registry(tmp_path)
    removed = []
    monkeypatch.setattr(net, "remove_lease_objects", lambda lease: removed.append(lease.vm_id) or [])
    real_all = LeaseBook.all

    def all_after_a_new_vm(self):
        if not registry.has("new0000000ab"):
            registry.add(VMRecord(vm_id="new0000000ab", backend="qemu", accel="tcg", profile="base",
                                  run_dir=str(tmp_path), owner_pid=1, owner_start=1))
            LeaseBook(registry.db_path).allocate("new0000000ab", "10.213.0.0/24", "", list)
        return real_all(self)

    LeaseBook(registry.db_path).allocate("gone000000ab", "10.213.0.0/24", "", list)
    monkeypatch.setattr(LeaseBook, "all", all_after_a_new_vm)
    done = net.cleanup_leases(registry.db_path, registry.has)
    assert removed == ["gone000000ab"] and "of VM gone000000ab" in done[-1]
    assert [x.vm_id for x in real_all(LeaseBook(registry.db_path))] == ["new0000000ab"]


def test_name_servers_are_a_deliberate_choice(tmp_path):
    from smolvm_kernel.host.net import guest_name_servers, host_name_servers

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\nsearch lan\n")
    host = lambda: host_name_servers(str(resolv))   # noqa: E731
    assert host() == ["192.0.2.53"]                 # loopback and IPv6 servers are unreachable from a VM
    assert guest_name_servers(["host"], host=host) == (["192.0.2.53"], [])
    assert guest_name_servers(["198.51.100.1", "host"], host=host)[0] == ["198.51.100.1", "192.0.2.53"]
    assert guest_name_servers(["none"], host=host) == ([], [])
    assert guest_name_servers([], host=host) == ([], [])
    servers, notes = guest_name_servers(["host"], host=lambda: [])
    assert servers == [] and "no name server a VM can reach" in notes[0]


def test_an_allowlist_decides_which_name_servers_a_guest_gets():
    from smolvm_kernel.host.net import guest_name_servers

    allow = [Allow.parse("192.0.2.53/32:53"), Allow.parse("198.51.100.0/24:443")]
    servers, notes = guest_name_servers(["192.0.2.53", "198.51.100.9"], allow)
    assert servers == ["192.0.2.53"]
    assert "198.51.100.9/32:53" in notes[0]
    assert guest_name_servers(["198.51.100.9"], [Allow.parse("198.51.100.0/24")])[0] == ["198.51.100.9"]
    # DNS can be allowlisted: the rules let UDP and TCP port 53 through to it.
    rules = render_rules(Lease("vm0123456789", "", "10.213.0.0/30", "smv0", "smolvm_vm0"), allow)
    assert "ip daddr 192.0.2.53/32 meta l4proto { tcp, udp } th dport { 53 } accept" in rules


@pytest.mark.parametrize("value, words", [
    (["dns.example"], "neither an IPv4 address"),
    (["none", "192.0.2.1"], "mixes 'none'"),
])
def test_bad_dns_settings_name_the_fix(value, words):
    with pytest.raises(ConfigError, match=words):
        SandboxConfig().changed(dns=value)


def test_dns_from_the_environment(monkeypatch):
    assert SandboxConfig().validated().dns == ["host"]
    monkeypatch.setenv("SMOLVM_DNS", "192.0.2.1, 198.51.100.2")
    assert SandboxConfig().validated().dns == ["192.0.2.1", "198.51.100.2"]
    monkeypatch.setenv("SMOLVM_DNS", "none")
    assert SandboxConfig().validated().dns == ["none"]


def test_guest_resolv_conf(tmp_path):
    from smolvm_guest.seed import write_resolv_conf

    path = tmp_path / "resolv.conf"
    write_resolv_conf(["192.0.2.53"], str(path))
    assert path.read_text().splitlines()[1:] == ["nameserver 192.0.2.53", "options timeout:2 attempts:2"]
    target = tmp_path / "elsewhere"
    path.unlink()
    path.symlink_to(target)
    write_resolv_conf([], str(path))
    assert not path.is_symlink() and not target.exists()
    assert "nameserver" not in path.read_text()
