"""hostd against its callers, as the callers are: not root.

The service runs here, as root, on a socket in a 0755 folder; the callers are
processes that setuid() to ``nobody`` (65534) or another uid (65533) first,
so every uid check is made against a real non-root peer. They run the
system's Python with the standard library only (root's venv is not theirs to
read). Each test here failed on the hostd before issue 21 item 4.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from smolvm_kernel.classroom.hostd import HostService
from smolvm_kernel.host import policy
from smolvm_kernel.host.admission import HostClient
from smolvm_kernel.host.audit import AuditLog

from support import loop_thread, remove_cgroup_parent, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setuid() to nobody needs root")

NOBODY, OTHER = 65534, 65533
PY = shutil.which("python3", path="/usr/bin:/bin") or sys.executable

#: A caller's helpers, prefixed to each script: ask(req) on one connection.
LIB = """
import json, os, socket, sys, time
PATH = sys.argv[1]
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(PATH)
    return s, s.makefile("rb")
def ask(c, req):
    s, f = c
    s.sendall(json.dumps(req).encode() + b"\\n")
    line = f.readline()
    return json.loads(line) if line else None
def out(**kw):
    print(json.dumps(kw), flush=True)
"""


def _policy(**caps) -> policy.Policy:
    return policy.Policy("/etc/smolvm/policy.toml", **caps)


@pytest.fixture
def folder():
    """A folder callers of any uid can reach (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="hostd-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(folder):
    """start(pol, **kw) -> a running HostService on folder/hostd.sock (keywords
    this hostd does not know are left out, so the tests run against older ones)."""
    services = []
    with loop_thread() as run:
        def start(pol=None, **kw):
            known = inspect.signature(HostService).parameters
            kw.setdefault("audit", AuditLog(folder / "audit.jsonl"))
            kw.setdefault("host_available_mib", lambda: 100_000)
            kw.setdefault("make_cgroups", False)
            svc = HostService(str(folder / "hostd.sock"), pol, **{k: v for k, v in kw.items() if k in known})
            run(svc.start())
            services.append(svc)
            return svc

        yield start
        for svc in services:
            run(svc.close())


@pytest.fixture
def cgroup_parent():
    """A folder of this test's own for the grants' cgroups (hostd caps it: not the host's)."""
    from smolvm_kernel.host import cgroups

    name = f"smolvm-hostd-test-{os.getpid()}"
    if isinstance(cgroups.probe(name), str):
        pytest.skip(f"no cgroup hierarchy here: {cgroups.probe(name)}")
    yield name
    remove_cgroup_parent(name)


def _as(uid: int, script: str, path: str, *args: str, timeout: float = 60, **popen):
    """Run a caller script as ``uid``; Popen if popen says so, else its output lines as JSON."""
    cmd = [PY, "-c", LIB + textwrap.dedent(script), path, *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, user=uid, group=uid, extra_groups=[], text=True, cwd="/", **popen)
    done = subprocess.run(cmd, user=uid, group=uid, extra_groups=[], text=True, cwd="/",
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_admit_beyond_each_per_vm_cap_is_refused_in_the_policys_words(start):
    svc = start(_policy(max_vcpus=1, max_mem_mib=512, max_disk_mib=2048, profiles=("base",), network=("none",)))
    ok = {"disk_mib": 2048, "profile": "base", "network": "none"}
    asks = [{"vcpus": 64, "mem_mib": 512, **ok}, {"vcpus": 100000, "mem_mib": 512, **ok},
            {"vcpus": 1, "mem_mib": 4096, **ok}, {"vcpus": 1, "mem_mib": 512, **ok, "disk_mib": 4096},
            {"vcpus": 1, "mem_mib": 512, **ok, "profile": "gpu"},
            {"vcpus": 1, "mem_mib": 512, **ok, "network": "nat"},
            {"vcpus": 1, "mem_mib": 512},                                   # says nothing of disk etc.
            {"vcpus": 1, "mem_mib": 512, **ok}]
    replies = _as(NOBODY, """
        c = conn()
        for req in json.loads(sys.argv[2]):
            out(**ask(c, {"op": "admit", "kernel_id": "k", **req}))
    """, svc.path, json.dumps(asks))
    whose = "the instructor's policy (/etc/smolvm/policy.toml)"
    assert [r["ok"] for r in replies] == [False] * 7 + [True], replies
    assert f"vcpus=64 is above the cap of 1 vCPUs per microVM (max_vcpus) set by {whose}" in replies[0]["why"]
    assert "vcpus=100000 is above the cap of 1 vCPUs" in replies[1]["why"]
    assert f"mem_mib=4096 is above the cap of 512 MiB per microVM (max_mem_mib) set by {whose}" in replies[2]["why"]
    assert f"disk_mib=4096 is above the cap of 2048 MiB per microVM (max_disk_mib) set by {whose}" in replies[3]["why"]
    assert f"profile='gpu' is not allowed by {whose}, which allows 'base' (profiles)" in replies[4]["why"]
    assert f"network='nat' is not allowed by {whose}, which allows 'none' (network)" in replies[5]["why"]
    assert "does not say its disk size (disk_mib)" in replies[6]["why"]
    refused = [e for e in svc.audit.read() if e["event"] == "refused"]
    assert len(refused) == 7 and all(e["uid"] == NOBODY and e["user"] == "nobody" for e in refused)


def test_vcpus_beyond_the_hosts_cores_are_refused_without_a_policy(start):
    svc = start(None)
    cores = len(os.sched_getaffinity(0))
    replies = _as(NOBODY, """
        c = conn()
        for n in json.loads(sys.argv[2]):
            out(**ask(c, {"op": "check", "vcpus": n, "mem_mib": 256}))
        out(**ask(c, {"op": "admit", "vcpus": 100000, "mem_mib": 256}))
        out(**ask(c, {"op": "admit", "vcpus": 1, "mem_mib": 1 << 30}))
    """, svc.path, json.dumps([cores, cores + 1]))
    assert [r["ok"] for r in replies] == [True, False, False, False], replies
    assert f"vcpus={cores + 1} is more than this host's {cores} CPU cores" in replies[1]["why"]
    assert f"vcpus=100000 is more than this host's {cores} CPU cores" in replies[2]["why"]
    assert f"mem_mib={1 << 30} is more than this host's" in replies[3]["why"]
    assert not svc.admissions.grants


def test_a_thousand_idle_connections_of_one_uid_do_not_stop_another_uid(start):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    svc = start(_policy(max_vms_per_user=1))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard      # hostd raised its own soft limit
    flood = _as(NOBODY, """
        held = [conn() for _ in range(32)]
        out(first=[ask(c, {"op": "ls"})["ok"] for c in held])      # all 32 served
        s33, f33 = conn()
        s33.settimeout(5)
        try:
            line = f33.readline()                                  # told, unasked, and hung up on
        except OSError:
            line = b""
        out(thirty_third=json.loads(line) if line else None)
        more = [conn() for _ in range(967)]                        # 1,000 in all
        out(ready=True)
        sys.stdin.readline()
    """, svc.path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        first = json.loads(flood.stdout.readline())
        assert first["first"] == [True] * 32
        third = json.loads(flood.stdout.readline())["thirty_third"]
        assert third and third["ok"] is False and "has 32 connections open" in third["why"] \
            and "the most it allows per user (32)" in third["why"], third
        assert json.loads(flood.stdout.readline()) == {"ready": True}
        assert svc.connections[NOBODY] == 32
        (other,) = _as(OTHER, """
            out(**ask(conn(), {"op": "admit", "vcpus": 1, "mem_mib": 256, "kernel_id": "other"}))
        """, svc.path, timeout=30)
        assert other["ok"] is True, other
    finally:
        flood.stdin.close()
        flood.wait(30)
        flood.stdout.close()
    assert wait_for(lambda: not svc.connections.get(NOBODY), 10)


def test_an_idle_connection_that_holds_no_grant_is_closed(start):
    svc = start(None, idle_timeout=0.5)
    (got,) = _as(NOBODY, """
        s, f = conn()
        t = time.monotonic()
        line = f.readline()                      # nothing asked: the service hangs up
        out(eof=line == b"", after=time.monotonic() - t)
    """, svc.path, timeout=20)
    assert got["eof"] and got["after"] < 5, got
    holder = HostClient(svc.path)               # a connection with a grant is the kernel's: kept
    holder.admit(1, 256)
    time.sleep(1.0)
    assert holder.list()[0]["id"] == holder.grant
    holder.close()


def test_ten_thousand_forged_events_neither_rotate_roots_entries_away_nor_pose_as_them(start, folder):
    svc = start(None, audit=AuditLog(folder / "audit.jsonl", max_bytes=200_000))
    root = HostClient(svc.path)
    root.admit(1, 256, kernel_id="root-kernel")
    replies = _as(NOBODY, """
        s, f = conn()
        junk = "x" * 20000
        for i in range(10000):
            name = ("admit", "release", "push", "refused", "\\x1b[31mowned")[i % 5]
            s.sendall(json.dumps({"op": "event", "event": name, "fields": {
                "grant": 1, "kernel_id": "root-kernel", "by": "hostd", "uid": 0, "user": "root",
                "path": junk, "what": "a microVM", "why": "forged"}}).encode() + b"\\n")
        out(**ask((s, f), {"op": "ls"}))
    """, svc.path, timeout=120)
    assert replies[0]["ok"]
    own = [json.loads(line) for line in (folder / "audit-hostd.jsonl").read_text().splitlines()]
    assert [(e["event"], e["kernel_id"], e["uid"]) for e in own if e["event"] == "admit"] \
        == [("admit", "root-kernel", 0)]
    assert all(e["by"] == "hostd" for e in own)
    assert not [e for e in own if e["uid"] == NOBODY and e["event"] != "events_dropped"]
    timeline = [json.loads(line) for f in sorted(folder.glob("audit.jsonl*")) if not f.name.endswith(".lock")
                for line in f.read_text().splitlines()]
    theirs = [e for e in timeline if e["uid"] == NOBODY]
    assert theirs and not [e for e in theirs if e["event"] in ("admit", "release") or "owned" in e["event"]]
    assert all(e["by"] == "user" for e in theirs if e["event"] != "events_dropped")
    assert all(len(e.get("path", "")) <= 1025 and "grant" not in e for e in theirs)
    assert len(theirs) < 1000          # the rate limit, not the disk, decides
    root.close()


def test_only_the_holders_own_child_joins_once_and_no_other_process(cgroup_parent, start):
    parent = cgroup_parent
    svc = start(None, make_cgroups=True, cgroup_parent=parent)
    holder = _as(NOBODY, """
        c = conn()
        g = ask(c, {"op": "admit", "vcpus": 1, "mem_mib": 256, "kernel_id": "k"})["grant"]
        out(grant=g, holder=os.getpid())
        def joiner(grandchild=False, stay=False):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                if grandchild:
                    kid = os.fork()
                    if kid:
                        os.waitpid(kid, 0)
                        os._exit(0)
                rep = ask(conn(), {"op": "join", "grant": g})
                os.write(w, (json.dumps({"pid": os.getpid(), **rep}) + "\\n").encode())
                os.close(w)
                if stay:
                    time.sleep(60)
                os._exit(0)
            os.close(w)
            rep = json.loads(os.fdopen(r).readline())
            if not stay:
                os.waitpid(pid, 0)
            return pid, rep
        vmm, first = joiner(stay=True)
        out(first=first)
        out(second=joiner()[1])
        out(grandchild=joiner(grandchild=True)[1])
        sys.stdin.readline()                      # the test asks from elsewhere meanwhile
        os.kill(vmm, 9)
        os.waitpid(vmm, 0)
        out(after_exit=joiner()[1])
        sys.stdin.readline()
    """, svc.path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        read = lambda: json.loads(holder.stdout.readline())                       # noqa: E731
        grant = read()["grant"]
        first = read()["first"]
        assert first["ok"] is True, first
        assert f"hostd-{grant}-" in Path(f"/proc/{first['pid']}/cgroup").read_text()
        second = read()["second"]
        assert second["ok"] is False and "one VMM per grant" in second["why"], second
        grandchild = read()["grandchild"]
        assert grandchild["ok"] is False and "only a child of the process holding the grant" in grandchild["why"]
        join = 'out(**ask(conn(), {"op": "join", "grant": int(sys.argv[2])}))'
        (stranger,) = _as(NOBODY, join, svc.path, grant)                       # same uid, not its child
        assert stranger["ok"] is False and "only a child" in stranger["why"], stranger
        (other,) = _as(OTHER, join, svc.path, grant)                           # another uid
        assert other["ok"] is False and "no such grant" in other["why"], other
        holder.stdin.write("\n")
        holder.stdin.flush()
        after = read()["after_exit"]         # its VMM gone (a pause), the next one may join (the resume)
        assert after["ok"] is True, after
        dirs = list(svc.admissions.grants[grant].cgroup.dirs)
        assert all(d.parent.name == parent for d in dirs)
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
    assert wait_for(lambda: not svc.admissions.grants, 10)
    assert wait_for(lambda: not any(d.exists() for d in dirs), 10), dirs


def test_the_grants_cgroups_sit_in_one_folder_with_the_hosts_caps(cgroup_parent, start):
    from smolvm_kernel.classroom import grants
    from smolvm_kernel.host import cgroups

    parent = cgroup_parent
    pol = _policy(host_max_guest_mem_mib=1024, host_max_vms=2, host_reserve_mib=512)
    svc = start(pol, make_cgroups=True, cgroup_parent=parent)
    client = HostClient(svc.path)
    try:
        client.admit(1, 256)
        dirs = client.cgroup.dirs
        assert all(d.parent.name == parent for d in dirs), dirs
        where = cgroups.probe(parent)
        cores = len(os.sched_getaffinity(0))
        want = grants.host_limits(pol, cores, grants._mem_total_mib())
        assert want.memory_bytes == (1024 + 2 * grants.VMM_OVERHEAD_MIB) * 2**20
        mem = where.parents["memory"]
        name = "memory.max" if where.version == 2 else "memory.limit_in_bytes"
        assert int((mem / name).read_text()) == want.memory_bytes
        if where.version == 1 and "cpu" in where.parents:
            assert int((where.parents["cpu"] / "cpu.cfs_quota_us").read_text()) == cores * 100_000
        if "pids" in where.parents:
            assert int((where.parents["pids"] / "pids.max").read_text()) == want.pids
    finally:
        client.close()
    assert wait_for(lambda: not any(d.exists() for d in dirs), 10)


def test_the_start_time_check_refuses_a_reused_pid(tmp_path, monkeypatch):
    """The pid races, with /proc faked: the holder's pid now someone else's, and
    the joiner's pid reused while it was being moved in (moved back)."""
    from smolvm_kernel.classroom.callers import Peer, Proc
    from smolvm_kernel.host import cgroups

    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    holder_fd, joiner_fd, other_fd = (os.pidfd_open(p.pid) for p in sleepers)

    class FakeProc(Proc):
        def __init__(self):
            self.table = {100: (1, 5000), 200: (100, 7000)}       # pid: (parent, start time)
            self.on_write = None

        def stat(self, pid):
            return self.table.get(pid)

    proc = FakeProc()
    svc = HostService(str(tmp_path / "s.sock"), None, audit=AuditLog(tmp_path / "a.jsonl"),
                            make_cgroups=False, proc=proc)
    grant = svc.admissions.admit(NOBODY, "nobody", 1, 256)
    grant.holder_pid, grant.holder_start, grant.holder_pidfd = 100, 5000, holder_fd
    d, back = tmp_path / "grant", tmp_path / "origin"
    d.mkdir()
    back.mkdir()
    grant.cgroup = cgroups.VMGroup("g", [d], cgroups.Limits.for_shape(256, 1, 256), 2)
    monkeypatch.setattr(cgroups, "folders_of", lambda pid, dirs: [back])
    joiner = Peer(200, NOBODY, "nobody", joiner_fd, 7000)

    proc.table[100] = (1, 9999)                     # the holder exited; its pid is another process's
    assert "the process that holds the grant has exited" in svc._join(joiner, grant.id)["why"]
    assert not (d / "cgroup.procs").exists()
    proc.table[100] = (1, 5000)

    # The joiner exits as it is moved in and its pid is reused: moved back, refused.
    real_write = Path.write_text

    def write(self, text, *a, **kw):
        real_write(self, text, *a, **kw)
        if self.parent == d:
            proc.table[200] = (100, 7777)
    monkeypatch.setattr(Path, "write_text", write)
    assert "exited while it was being moved" in svc._join(joiner, grant.id)["why"]
    assert (back / "cgroup.procs").read_text() == "200"
    monkeypatch.setattr(Path, "write_text", real_write)
    proc.table[200] = (100, 7000)

    sleepers[1].kill()                              # the joiner's own process is gone (its pidfd says)
    sleepers[1].wait()
    assert "not the one that connected" in svc._join(joiner, grant.id)["why"]

    fresh = Peer(200, NOBODY, "nobody", other_fd, 7000)
    assert svc._join(fresh, grant.id) == {"ok": True}
    assert "one VMM per grant" in svc._join(fresh, grant.id)["why"]
    sleepers[2].kill()
    sleepers[2].wait()
    sleepers[0].kill()
    sleepers[0].wait()
    for fd in (holder_fd, joiner_fd, other_fd):
        os.close(fd)


def test_ls_all_escapes_what_users_wrote(start, capsys):
    from smolvm_kernel import cli

    svc = start(None)
    caller = _as(NOBODY, """
        c = conn()
        ask(c, {"op": "admit", "vcpus": 1, "mem_mib": 256, "kernel_id": "k\\x1b[2J\\x1b[31mroot\\nFAKE 0 1"})
        c[0].sendall(json.dumps({"op": "event", "event": "start",
                                 "fields": {"vm_id": "\\x1b]0;owned\\x07\\u202eabc"}}).encode() + b"\\n")
        out(**ask(c, {"op": "ls"}))
        sys.stdin.readline()
    """, svc.path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert json.loads(caller.stdout.readline())["ok"]
        assert cli._ls_host(svc.path) == 0
    finally:
        caller.stdin.close()
        caller.wait(30)
        caller.stdout.close()
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown, shown
    assert len(shown.splitlines()) == 2, shown                  # the header and one grant
    assert "\\x1b[31mroot\\nFAKE" in shown
