"""Two hosts behind one gateway, on this machine: two network namespaces made
by the test, each with its own sshd (pinned host key, key-only login) and its
own state folder and budget; a Jupyter Server with gateway_provisioners and
the SmolVM placement reaches them over veth pairs. Kernels land on both hosts
in microVMs there; a full host and a dead host are skipped with their reason.
Nothing is sent outside the namespaces and veth pairs the test made.

Run as root (namespaces, sshd); CI does.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gateway_provisioners", reason="pip install gateway_provisioners (the test extra has it)")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes network namespaces and runs sshd: run as root")

SSHD = "/usr/sbin/sshd"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    def __init__(self, n: int, tag: str, folder: Path) -> None:
        self.n, self.ns = n, f"smvg{tag}h{n}"
        self.outer, self.inner = f"smvg{tag}{n}r", f"smvg{tag}{n}n"
        self.gw_ip, self.ip = f"10.199.{n}.1", f"10.199.{n}.2"
        self.folder = folder / f"h{n}"
        self.state = self.folder / "state"
        self.sshd: subprocess.Popen | None = None
        self.hostd: subprocess.Popen | None = None

    def netns_inode(self) -> int:
        return os.stat(f"/run/netns/{self.ns}").st_ino

    def vmms(self) -> list[int]:
        """QEMU processes inside this host's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        pids = []
        for pid in out:
            try:
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                    pids.append(int(pid))
            except OSError:
                pass
        return pids


@contextlib.contextmanager
def two_hosts(folder: Path, host2_max_vms: int | None = 1):
    """Two hosts in namespaces with sshd, and a Jupyter Server with
    gateway_provisioners reaching them; yields (client, hosts). Everything is
    removed on exit. Also used by benchmarks/gateway_bench.py."""
    from smolvm_kernel.jupyter import kernelspec
    from hubclient import ServerUser

    if not Path(SSHD).exists():
        raise RuntimeError("openssh-server is missing: scripts/install-system-deps --test installs it")
    tag = secrets.token_hex(2)
    home = folder / "home"
    (home / ".ssh").mkdir(parents=True)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh" / "id_ed25519"))
    (folder / "authorized_keys").write_text((home / ".ssh" / "id_ed25519.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)
    hs = [Host(1, tag, folder), Host(2, tag, folder)]
    known = []
    server = None
    try:
        for h in hs:
            h.folder.mkdir()
            sh("ip", "netns", "add", h.ns)
            sh("ip", "link", "add", h.outer, "type", "veth", "peer", "name", h.inner)
            sh("ip", "link", "set", h.inner, "netns", h.ns)
            sh("ip", "addr", "add", f"{h.gw_ip}/24", "dev", h.outer)
            sh("ip", "link", "set", h.outer, "up")
            for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{h.ip}/24", "dev", h.inner],
                        ["ip", "link", "set", h.inner, "up"]):
                sh("ip", "netns", "exec", h.ns, *cmd)
            if h.n != 1:    # the gateway's response address is on host 1's link
                sh("ip", "netns", "exec", h.ns, "ip", "route", "add", "10.199.1.0/24", "via", h.gw_ip)
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(h.folder / "host_key"))
            kind, key = (h.folder / "host_key.pub").read_text().split(" ")[:2]
            known.append(f"{h.ip} {kind} {key}")
            env = [f"SMOLVM_STATE_DIR={h.state}"]
            if h.n == 2 and host2_max_vms:
                (h.folder / "policy.toml").write_text(f'hostd = "{h.folder}/hostd.sock"\n'
                                                      f"host_max_vms = {host2_max_vms}\n"
                                                      f'audit_log = "{h.folder}/audit.jsonl"\n')
                env.append(f"SMOLVM_POLICY_FILE={h.folder}/policy.toml")
                h.hostd = subprocess.Popen([str(Path(sys.executable).with_name("smolvm-kernel")), "hostd",
                                            "--socket", str(h.folder / "hostd.sock")],
                                           env={**os.environ, "SMOLVM_POLICY_FILE": str(h.folder / "policy.toml")},
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                env.append("SMOLVM_POLICY_FILE=/nonexistent")
            (h.folder / "sshd_config").write_text(
                f"ListenAddress {h.ip}\nPort 22\nHostKey {h.folder}/host_key\nPidFile {h.folder}/sshd.pid\n"
                f"AuthorizedKeysFile {folder}/authorized_keys\nPasswordAuthentication no\n"
                f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n"
                f"StrictModes no\nSetEnv {' '.join(env)}\n")
            h.sshd = subprocess.Popen(["ip", "netns", "exec", h.ns, SSHD, "-D", "-e", "-f",
                                       str(h.folder / "sshd_config")],
                                      stdout=open(h.folder / "sshd.log", "wb"), stderr=subprocess.STDOUT)
        (home / ".ssh" / "known_hosts").write_text("\n".join(known) + "\n")
        for h in hs:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection((h.ip, 22), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError((h.folder / "sshd.log").read_text()) from None
                    time.sleep(0.2)
        kernelspec.install("smolvm-hosts", prefix=str(folder), gateway_hosts=[h.ip for h in hs])
        genv = {**os.environ, "HOME": str(home), "JUPYTER_PATH": str(folder / "share" / "jupyter"),
                "GP_RESPONSE_IP": hs[0].gw_ip, "GP_RESPONSE_PORT": str(_free_port()),
                "GP_KERNEL_LOG_DIR": str(folder), "GP_REMOTE_USER": "root",
                "KERNEL_USERNAME": "smolvm-test", "JUPYTER_RUNTIME_DIR": str(folder / "runtime")}
        user, server = ServerUser.start(folder, genv)
        yield user, hs
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        for h in hs:
            pids = subprocess.run(["ip", "netns", "pids", h.ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-KILL", pid], capture_output=True)
            for proc in (h.sshd, h.hostd):
                if proc is not None and proc.poll() is None:
                    proc.kill()
            subprocess.run(["ip", "link", "del", h.outer], capture_output=True)
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def hosts(image, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hosts")
    with two_hosts(folder) as (user, hs):
        yield user, hs, folder




def _doctor(hs, folder: Path) -> str:
    cli = Path(sys.executable).with_name("smolvm-kernel")
    proc = subprocess.run([str(cli), "doctor", "--hosts", ",".join(h.ip for h in hs), "--user", "root"],
                          env={**os.environ, "HOME": str(folder / "home")}, capture_output=True, text=True,
                          timeout=180)
    return proc.stdout + proc.stderr


def _state(doctor: str, h) -> str | None:
    for line in doctor.splitlines():
        parts = line.split()
        if parts[:1] == [h.ip]:
            return parts[1]
    return None


def _where(hs) -> dict[int, list[int]]:
    return {h.n: h.vmms() for h in hs}


@pytest.mark.timeout(900)
def test_kernels_are_placed_on_both_hosts_and_skip_a_full_or_dead_host(hosts):
    user, hs, folder = hosts
    h1, h2 = hs
    a = user.start_kernel("smolvm-hosts")
    b = user.start_kernel("smolvm-hosts")
    for kid in (a, b):
        r = user.run_cell(kid, "import platform\nplatform.release()")
        assert r.status == "ok" and "cloud-amd64" in r.text, r.text
    where = _where(hs)
    assert len(where[1]) == 1 and len(where[2]) == 1, where       # one VM in each host's namespace
    # An interrupt through the gateway reaches host 1's launcher over its veth link.
    r = user.interrupt_cell(a)
    assert any(o["content"].get("ename") == "KeyboardInterrupt" for o in r.outputs), r.outputs
    for h in hs:                                                  # and in that namespace's network stack
        assert os.stat(f"/proc/{h.vmms()[0]}/ns/net").st_ino == h.netns_inode()
        assert list((h.state / "vms").iterdir())                  # in that host's own state folder

    # Host 2 is full (its budget: one VM): the next two kernels go to host 1.
    c = user.start_kernel("smolvm-hosts")
    d = user.start_kernel("smolvm-hosts")
    for kid in (c, d):
        assert user.run_cell(kid, "1 + 1").text == "2"
    assert len(_where(hs)[1]) == 3 and len(_where(hs)[2]) == 1
    # doctor --hosts: a line per host, over the same pinned SSH.
    doctor = _doctor(hs, folder)
    assert _state(doctor, h1) == "ok" and _state(doctor, h2) == "FULL", doctor
    assert "this host runs 1 microVMs" in doctor and re.search(r"accelerator (tcg|kvm|hvf)", doctor), doctor
    log = (folder / "server.log").read_text()
    assert f"{h2.ip} skipped: full (the host refused" in log or f"{h2.ip} skipped: full (this host runs 1" in log, \
        log[-3000:]

    # Shut one down: nothing of it is left on its host.
    user.server("DELETE", f"/api/kernels/{d}")
    deadline = time.monotonic() + 30
    while len(_where(hs)[1]) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_where(hs)[1]) == 2

    # Host 2 dies (everything in its namespace killed, its sshd included). The
    # gateway finds kernel b gone (its communication port is dead) and restarts
    # it, which places it on host 1; the next new kernel goes there too, and the
    # log says why host 2 was skipped.
    assert user.run_cell(b, "x = 'on host 2'").status == "ok"
    for pid in subprocess.run(["ip", "netns", "pids", h2.ns], capture_output=True, text=True).stdout.split():
        subprocess.run(["kill", "-KILL", pid], capture_output=True)
    deadline = time.monotonic() + 120
    while len(_where(hs)[1]) != 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_where(hs)[1]) == 3 and _where(hs)[2] == [], _where(hs)
    r = user.run_cell(b, "'x' in globals()")
    assert r.text.endswith("False")                                   # b runs again, in a fresh VM on host 1
    assert f"this kernel's host {h2.ip} down (its SSH port" in r.text and f"placed it on {h1.ip}" in r.text, r.text
    started = []
    while f"{h2.ip} skipped: down" not in (folder / "server.log").read_text() and len(started) < 2:
        # Until round-robin's turn comes to host 2 (the restart took one turn).
        started.append(user.start_kernel("smolvm-hosts"))
        assert user.run_cell(started[-1], "'placed'").text == "'placed'"
    assert f"{h2.ip} skipped: down" in (folder / "server.log").read_text()
    doctor = _doctor(hs, folder)
    assert _state(doctor, h1) == "ok" and _state(doctor, h2) == "DOWN", doctor
    assert len(_where(hs)[1]) == 3 + len(started) and _where(hs)[2] == []
    for kid in (a, b, c, *started):
        user.server("DELETE", f"/api/kernels/{kid}")
    deadline = time.monotonic() + 60
    while _where(hs)[1] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _where(hs)[1] == []
    assert not [p for p in (h1.state / "vms").iterdir()]          # nothing of them left on host 1
