"""The classroom on loopback: JupyterHub, three real Unix students, their
JupyterLab servers, one microVM each, the instructor's policy, quotas, idle
pause and culling, and the audit log that says what happened.

Run as root (it creates Unix accounts and removes them afterwards); CI does,
and under CI=true a run that is not root fails instead of skipping.

It also assumes a student's server may be talked into running code on the host
(docs/classroom.md): the routes found so far (nbconvert templates and their
conf.json from the home, kernels started in any folder) are tried and must
fail, and every process of a student, however started, must sit in their
root-made cgroup.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from support import wait_for

_NOT_ROOT = os.geteuid() != 0
# Skipped when not root, except under CI, where a skip would hide that nothing ran.
pytestmark = pytest.mark.skipif(_NOT_ROOT and os.environ.get("CI") != "true",
                                reason="creates Unix accounts for its students: run as root")


@pytest.fixture(autouse=True, scope="module")
def _root_under_ci():
    if _NOT_ROOT:
        pytest.fail("CI=true and not root: the classroom test must run (as root), not be skipped")

POLICY = """
max_vcpus = 1
max_mem_mib = 512
max_exec_timeout = 120
network = ["none"]
profiles = ["base", "smolvm-test-course"]
pause_after = 20
max_checkpoints = 2
max_checkpoint_mib = 2048
max_vms_per_user = 1
host_max_vms = 6
hostd = "{dir}/hostd.sock"
audit_log = "{dir}/audit.jsonl"
"""
CULL_S = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Classroom:
    def __init__(self, folder: Path, port: int, students: list[tuple[str, str]], hub: subprocess.Popen):
        self.folder, self.port, self.students, self.hub = folder, port, students, hub
        self.base = f"http://127.0.0.1:{port}"
        self.clients: dict[str, object] = {}

    def audit(self) -> list[dict]:
        path = self.folder / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def student(self, i: int):
        from hubclient import HubStudent

        name, password = self.students[i]
        if name not in self.clients:
            client = HubStudent(self.base, name, password)
            client.login()
            client.start_server()
            self.clients[name] = client
        return self.clients[name]


@pytest.fixture(scope="module")
def classroom(course_image):
    from smolvm_kernel.classroom import deploy as cr
    from smolvm_kernel.classroom.provision import read_students

    folder = Path(tempfile.mkdtemp(prefix="smolvm-classroom-", dir="/tmp"))
    os.chmod(folder, 0o755)
    prefix = f"smvt{secrets.token_hex(2)}s"
    port = _free_port()
    hub = None
    try:
        cr.setup(folder, 3, port=port, prefix=prefix, cull_idle_timeout=CULL_S,
                 policy_text=POLICY.format(dir=folder), profiles=["base", course_image.profile])
        students = read_students(folder)
        log = open(folder / "hub.log", "wb")
        hub = subprocess.Popen(cr.hub_command(folder), cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        room = Classroom(folder, port, students, hub)
        while True:
            code, _ = _probe(room.base + "/hub/api/")
            if code == 200:
                break
            assert hub.poll() is None and time.monotonic() < deadline, (folder / "hub.log").read_text()[-3000:]
            time.sleep(0.5)
        yield room
    finally:
        if os.environ.get("SMOLVM_CLASSROOM_LOG") and (folder / "hub.log").exists():
            (folder / "hub.log").replace(os.environ["SMOLVM_CLASSROOM_LOG"])   # the hub's log, kept
        cr.teardown(folder, hub)


def _probe(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""




def _qemus_of(uid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if "qemu-system" not in (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"):
                continue
            status = (d / "status").read_text()
        except OSError:
            continue
        if any(line.split()[1] == str(uid) for line in status.splitlines() if line.startswith("Uid:")):
            pids.append(int(d.name))
    return pids


def _ram_maps(pid: int) -> list[tuple[str, int, int]]:
    """The (name, device, inode) of each file a VMM maps its guest RAM from: a
    snapshot's ram.bin, or hostd's memfd of it."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and ("/memfd:smolvm-ram-" in fields[5] or fields[5].endswith("/ram.bin")):
            st = os.stat(f"/proc/{pid}/map_files/{fields[0]}")
            out.add((fields[5], st.st_dev, st.st_ino))
    return sorted(out)


def _procs_of(uid: int) -> dict[int, str]:
    """pid -> command line of every process whose real or effective uid is ``uid``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        uids = next(line.split()[1:3] for line in status.splitlines() if line.startswith("Uid:"))
        if str(uid) in uids and cmd:
            out[int(d.name)] = cmd
    return out


def _cgroups_of(pid: int) -> dict[str, str]:
    """controller -> cgroup path (v2: the "" entry) of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctls, path = line.split(":", 2)
        for ctl in ctls.split(",") if ctls else [""]:
            out[ctl] = path
    return out


def _in_group(pid: int, pattern: str) -> bool:
    """Whether the memory, cpu and pids cgroups (v2: the one) of ``pid`` all match ``pattern``."""
    groups = _cgroups_of(pid)
    ctls = ["memory", "cpu", "pids"] if "memory" in groups else [""]
    return all(re.search(pattern, groups.get(ctl, "")) for ctl in ctls)


def _student_group(name: str) -> str:
    return rf"/smolvm-students/{re.escape(name)}$"


def _as(name: str, argv: list[str], **kw) -> subprocess.Popen:
    """A process started as the student directly by root (as su, ssh or cron would):
    not through the hub, so in no cgroup of theirs to begin with."""
    pw = pwd.getpwnam(name)
    return subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", *argv],
                            cwd="/", **kw)


def _host_ipykernels(uid: int) -> list[str]:
    return [c for c in _procs_of(uid).values() if "ipykernel" in c]


def _server_pid(uid: int) -> int:
    (pid,) = [p for p, c in _procs_of(uid).items() if "jupyterhub-singleuser" in c]
    return pid


def test_students_log_in_and_get_only_smolvm_kernels_and_no_host_shell(classroom):
    s = classroom.student(0)
    uid = pwd.getpwnam(s.name).pw_uid
    # the policy's profiles: base and the test course (conftest's course_image)
    assert set(s.server("GET", "/api/kernelspecs")["kernelspecs"]) == {"smolvm-python", "smolvm-smolvm-test-course"}
    code, _ = s.request("POST", f"/user/{s.name}/api/terminals")
    assert code == 404                                      # terminals are off
    code, body = s.request("PUT", f"/user/{s.name}/api/contents/.jupyter/jupyter_server_config.py",
                           {"type": "file", "format": "text", "content": "c.ServerApp.terminals_enabled = True"})
    assert code == 400, (code, body[:300])                  # no hidden files through the contents API
    assert not Path(pwd.getpwnam(s.name).pw_dir, ".jupyter/jupyter_server_config.py").exists()
    code, body = s.request("POST", f"/user/{s.name}/api/kernels", {"name": "python3"})
    assert code == 404, (code, body[:300])                  # no host Python kernel: no such kernel
    code, body = s.request("POST", f"/user/{s.name}/api/sessions", {
        "path": "x.ipynb", "type": "notebook", "name": "x.ipynb", "kernel": {"name": "python3"}})
    assert code == 501, (code, body[:300])                  # the sessions API: "not available"
    assert _host_ipykernels(uid) == []                      # and none started under the student's uid
    code, body = s.request("POST", f"/user/{s.name}/lab/api/extensions",
                           {"cmd": "install", "extension_name": "jupyterlab-night"})
    assert code == 422 and b"was blocked" in body, (code, body[:300])   # read-only manager: no pip install
    # A wrong password does not get in.
    from hubclient import HubError, HubStudent
    with pytest.raises(HubError):
        HubStudent(classroom.base, s.name, "wrong-" + secrets.token_hex(4)).login()


NOTEBOOK = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "# hello"}], "metadata": {},
            "nbformat": 4, "nbformat_minor": 5}


def _put(s, path: str, content: str | None = None) -> None:
    model = ({"type": "directory"} if content is None else
             {"type": "file", "format": "text", "content": content})
    s.server("PUT", f"/api/contents/{path}", model)


def test_nbconvert_runs_no_template_or_preprocessor_from_a_students_files(classroom):
    """nbconvert searches templates (Jinja, unsandboxed) in its working directory,
    which LocalProcessSpawner made the home, and a template folder's conf.json
    names preprocessor classes it imports and builds: both would run on the host."""
    s = classroom.student(0)
    home = Path(pwd.getpwnam(s.name).pw_dir)
    by_template, by_preprocessor = home / "ran-by-template", home / "ran-by-preprocessor"
    s.server("PUT", "/api/contents/x.ipynb", {"type": "notebook", "format": "json", "content": NOTEBOOK})
    _put(s, "lab")
    _put(s, "lab/index.html.j2", "{{ cycler.__init__.__globals__.os.system('touch %s') }}" % by_template)
    _put(s, "markdown")
    _put(s, "markdown/conf.json", json.dumps(
        {"preprocessors": {"00-x": {"type": "subprocess.Popen", "args": ["touch", str(by_preprocessor)]}}}))
    html_code, html = s.request("GET", f"/user/{s.name}/nbconvert/html/x.ipynb?download=false")
    md_code, md = s.request("GET", f"/user/{s.name}/nbconvert/markdown/x.ipynb?download=false")
    time.sleep(2)
    ran = [p.name for p in (by_template, by_preprocessor) if p.exists()]
    assert ran == [], f"ran on the host: {ran} (html {html_code}, markdown {md_code})"
    # Plain exports with the installed templates.
    assert html_code == 200 and b"<html" in html.lower() and b"hello" in html, (html_code, html[:300])
    assert md_code == 200 and b"# hello" in md, (md_code, md[:300])


def test_a_students_server_searches_nothing_in_their_home_for_code(classroom):
    """The server's working directory is root's, and the Jupyter data path (templates,
    kernelspecs, lab extensions) has nothing under the home."""
    s = classroom.student(0)
    pw = pwd.getpwnam(s.name)
    pid = _server_pid(pw.pw_uid)
    cwd = os.readlink(f"/proc/{pid}/cwd")
    assert os.stat(cwd).st_uid == 0 and not (cwd + "/").startswith(pw.pw_dir + "/"), cwd
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    python = str(Path(env["PATH"].split(":")[0]) / "python")
    out = subprocess.run(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", python, "-c",
         "import json; from jupyter_core.paths import jupyter_path, jupyter_config_path; "
         "print(json.dumps(jupyter_path() + jupyter_config_path()))"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    paths = json.loads(out.stdout)
    # JupyterLab's settings (JSON the frontend reads) stay the student's own.
    s.server("PUT", "/lab/api/settings/@jupyterlab/apputils-extension:themes",
             {"raw": '{"theme": "JupyterLab Dark"}'})
    assert (Path(pw.pw_dir) / ".jupyter/lab/user-settings/@jupyterlab/apputils-extension"
            / "themes.jupyterlab-settings").exists()
    assert [p for p in paths if (os.path.realpath(p) + "/").startswith(pw.pw_dir + "/")] == [], paths
    assert all(os.stat(p).st_uid == 0 for p in paths if os.path.exists(p)), paths


def test_a_kernel_cannot_start_outside_the_home_or_in_a_hidden_folder(classroom):
    """A kernel's working directory is where pushes land and pulls come from."""
    s = classroom.student(0)
    answers = {}
    for path in ("../../", ".local/share/jupyter", "lab/../.."):
        code, body = s.request("POST", f"/user/{s.name}/api/kernels", {"name": "smolvm-python", "path": path})
        if code == 201:
            s.server("DELETE", f"/api/kernels/{json.loads(body)['id']}")
        answers[path] = code
    code, body = s.request("POST", f"/user/{s.name}/api/sessions", {
        "path": ".local/x.ipynb", "type": "notebook", "name": "x.ipynb", "kernel": {"name": "smolvm-python"}})
    if code == 201:
        s.server("DELETE", f"/api/sessions/{json.loads(body)['id']}")
    answers["session in .local"] = code
    # The sessions API answers 500 to any error but a missing kernel (jupyter_server's
    # handler), with the refusal's reason.
    assert answers == {"../../": 403, ".local/share/jupyter": 403, "lab/../..": 403,
                       "session in .local": 500}, answers
    assert b"may not be hidden" in body, body[:300]
    assert s.server("GET", "/api/kernels") == []


def test_each_student_runs_in_a_microvm_of_their_own(classroom):
    kernels, owners = {}, {}
    for i in range(3):
        s = classroom.student(i)
        kernels[s.name] = s.start_kernel()
        r = s.run_cell(kernels[s.name], "import platform, os\nplatform.release(), os.getuid()")
        assert r.status == "ok", r.text
        assert "cloud-amd64" in r.text and platform_release() not in r.text
        # One VM each, its VMM run as the student (looked at before it idles long
        # enough to be paused).
        (owners[s.name],) = _qemus_of(pwd.getpwnam(s.name).pw_uid)
        # In the cgroup hostd made for its grant, with limits from the granted shape.
        assert "hostd-" in Path(f"/proc/{owners[s.name]}/cgroup").read_text()
    assert len(set(owners.values())) == 3
    # One sealed copy of the snapshot's RAM (hostd's memfd) mapped by every student's
    # VMM, and no ram.bin in any student's own snapshot cache.
    rams = {name: _ram_maps(pid) for name, pid in owners.items()}
    assert all(len(r) == 1 for r in rams.values()), rams
    assert len({r[0] for r in rams.values()}) == 1, rams
    for name, _ in classroom.students:
        home = Path(pwd.getpwnam(name).pw_dir)
        assert list(home.glob(".cache/smolvm-kernel/snapshots/*/state.bin")), name
        assert not list(home.glob(".cache/smolvm-kernel/snapshots/**/ram.bin")), name
    r = classroom.student(0).run_cell(kernels[classroom.students[0][0]], "%smolvm status")
    assert "memory 768 MiB, CPU 1 cores" in r.text and "made by hostd" in r.text, r.text
    classroom.kernels = kernels


def test_every_process_of_a_student_is_in_their_cgroup_however_started(classroom):
    """The server and its kernels from the spawn on; a VMM in the cgroup hostd made
    for its grant; a process started as the student by another route, within seconds."""
    for name, _ in classroom.students:
        classroom.student(classroom.students.index((name, _)))
        uid = pwd.getpwnam(name).pw_uid
        vmms = set(_qemus_of(uid))
        procs = _procs_of(uid)
        assert any("jupyterhub-singleuser" in c for c in procs.values()), procs
        for pid, cmd in procs.items():
            if pid in vmms:
                assert _in_group(pid, r"/hostd-[^/]+$"), (pid, cmd, _cgroups_of(pid))
            else:
                assert _in_group(pid, _student_group(name)), (pid, cmd, _cgroups_of(pid))
    name = classroom.students[0][0]
    stray = _as(name, ["sleep", "60"])
    try:
        assert wait_for(lambda: _in_group(stray.pid, _student_group(name)), 5, interval=0.2), _cgroups_of(stray.pid)
    finally:
        stray.kill()
        stray.wait()


def platform_release() -> str:
    return os.uname().release


PROBE = r"""
import json, os, socket, sys
home, pid, qmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {}
state = os.path.join(home, ".local/state/smolvm-kernel")
try:
    os.listdir(state); out["list_state"] = "allowed"
except OSError as exc:
    out["list_state"] = type(exc).__name__
try:
    open(f"/proc/{pid}/environ", "rb").read(); out["environ"] = "allowed"
except OSError as exc:
    out["environ"] = type(exc).__name__
try:
    os.kill(pid, 0); out["signal"] = "allowed"
except OSError as exc:
    out["signal"] = type(exc).__name__
# The socket's path comes from root (listing it may be refused): connect() is tried either way.
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(qmp); out["qmp"] = "allowed"
except OSError as exc:
    out["qmp"] = type(exc).__name__
finally:
    s.close()
print(json.dumps(out))
"""


def test_a_student_cannot_reach_another_students_vm(classroom):
    owner, other = classroom.students[0][0], classroom.students[1][0]
    home = pwd.getpwnam(owner).pw_dir
    classroom.student(0).run_cell(classroom.kernels[owner], "1")      # awake (not paused) for the probe
    (pid,) = _qemus_of(pwd.getpwnam(owner).pw_uid)
    (qmp,) = Path(home, ".local/state/smolvm-kernel/vms").glob("*/qmp.sock")     # root may look
    other_pw = pwd.getpwnam(other)
    probe = subprocess.run(
        ["setpriv", f"--reuid={other_pw.pw_uid}", f"--regid={other_pw.pw_gid}", "--init-groups",
         "/usr/bin/python3", "-I", "-c", PROBE, home, str(pid), str(qmp)],
        capture_output=True, text=True, timeout=30)
    seen = json.loads(probe.stdout)
    assert seen == {"list_state": "PermissionError", "environ": "PermissionError", "signal": "PermissionError",
                    "qmp": "PermissionError"}, seen
    # The same probe as the owner reaches everything: the probe itself works.
    own_pw = pwd.getpwnam(owner)
    mine = json.loads(subprocess.run(
        ["setpriv", f"--reuid={own_pw.pw_uid}", f"--regid={own_pw.pw_gid}", "--init-groups",
         "/usr/bin/python3", "-I", "-c", PROBE, home, str(pid), str(qmp)], capture_output=True, text=True,
        timeout=30).stdout)
    assert mine == {"list_state": "allowed", "environ": "allowed", "signal": "allowed", "qmp": "allowed"}, mine


def test_a_students_checkpoints_are_theirs_alone_and_capped(classroom):
    owner, other = classroom.students[0][0], classroom.students[1][0]
    s0, s1 = classroom.student(0), classroom.student(1)
    k0, k1 = classroom.kernels[owner], classroom.kernels[other]
    r = s0.run_cell(k0, "secret = 'mine'")
    assert r.status == "ok", r.text
    r = s0.run_cell(k0, "%smolvm checkpoint mine")
    assert r.status == "ok" and "checkpoint 'mine' saved" in r.text, r.text
    folder = Path(pwd.getpwnam(owner).pw_dir, ".local/state/smolvm-kernel/checkpoints")
    assert (folder / "mine" / "state.bin").exists()       # root may look: it is the owner's
    assert folder.stat().st_uid == pwd.getpwnam(owner).pw_uid and folder.stat().st_mode & 0o777 == 0o700
    # The other student neither lists, restores nor reads it.
    r = s1.run_cell(k1, "%smolvm checkpoints")
    assert r.status == "ok" and "no checkpoints yet" in r.text, r.text
    r = s1.run_cell(k1, "%smolvm restore mine")
    assert r.status == "error" and "there is no checkpoint 'mine'" in r.text, r.text
    reader = "import sys\ntry:\n    open(sys.argv[1], 'rb').read(1)\n    print('read')\nexcept OSError as e:\n" \
             "    print(type(e).__name__)"
    for name, expected in ((other, "PermissionError"), (owner, "read")):      # the probe works for the owner
        probe = _as(name, ["/usr/bin/python3", "-I", "-c", reader, str(folder / "mine" / "state.bin")],
                    stdout=subprocess.PIPE, text=True)
        assert probe.communicate(timeout=30)[0].strip() == expected, name
    # The instructor's cap, in its words; a restore brings the state back.
    assert s0.run_cell(k0, "%smolvm checkpoint second").status == "ok"
    r = s0.run_cell(k0, "%smolvm checkpoint third")
    assert r.status == "error" and "max_checkpoints = 2" in r.text, r.text
    assert s0.run_cell(k0, "secret = 'changed'").status == "ok"
    r = s0.run_cell(k0, "%smolvm restore mine")
    assert r.status == "ok" and "restored 'mine'" in r.text, r.text
    assert s0.run_cell(k0, "print(secret)").text.strip() == "mine"
    for name in ("mine", "second"):
        assert s0.run_cell(k0, f"%smolvm checkpoint --rm {name}").status == "ok"
    assert not (folder / "mine").exists()
    events = {e["event"] for e in classroom.audit() if e.get("user") == owner}
    assert {"checkpoint", "restore"} <= events, events


def test_a_student_cannot_raise_a_cap_or_turn_networking_on(classroom):
    s = classroom.student(0)
    kid = classroom.kernels[s.name]
    r = s.run_cell(kid, "%smolvm config --network nat")
    assert r.status == "error" and "not allowed by the instructor's policy" in r.text
    r = s.run_cell(kid, "%smolvm config --mem 4096")
    assert r.status == "error" and "cap of 512 MiB" in r.text
    refused = [e for e in classroom.audit() if e["event"] == "refused" and e.get("user") == s.name]
    assert {e["what"] for e in refused} >= {"network nat", "memory 4096 MiB"}


def test_a_quota_refusal_reaches_the_notebook_with_its_message(classroom):
    s = classroom.student(0)
    second = s.start_kernel()
    r = s.run_cell(second, "1 + 1")
    assert r.status == "error", r.text
    assert f"{s.name} has 1 microVM running" in r.text and "close another notebook" in r.text, r.text
    s.server("DELETE", f"/api/kernels/{second}")
    assert any(e["event"] == "refused" and e.get("user") == s.name and "has 1 microVM" in e.get("why", "")
               for e in classroom.audit())


def test_an_idle_vm_is_paused_to_disk_and_resumed_by_the_next_cell(classroom):
    s = classroom.student(1)
    kid = classroom.kernels[s.name]
    assert s.run_cell(kid, "kept = 'state'").status == "ok"
    deadline = time.monotonic() + 60
    while not any(e["event"] == "pause" and e.get("user") == s.name and e.get("kernel_id") == kid
                  for e in classroom.audit()):
        assert time.monotonic() < deadline, "the idle VM was not paused"
        time.sleep(1)
    assert _qemus_of(pwd.getpwnam(s.name).pw_uid) == []            # its VMM and memory are gone
    r = s.run_cell(kid, "kept")
    assert r.status == "ok" and "'state'" in r.text and "resumed in" in r.text, r.text
    assert any(e["event"] == "resume" and e.get("user") == s.name for e in classroom.audit())


def test_an_idle_kernel_is_culled_with_its_vm_and_the_log_says_so(classroom):
    s = classroom.student(2)
    kid = classroom.kernels[s.name]
    uid = pwd.getpwnam(s.name).pw_uid
    deadline = time.monotonic() + CULL_S * 4
    while any(k["id"] == kid for k in s.server("GET", "/api/kernels")):
        assert time.monotonic() < deadline, "the idle kernel was not culled"
        time.sleep(2)
    end = time.monotonic() + 15
    while _qemus_of(uid) and time.monotonic() < end:
        time.sleep(0.5)
    assert _qemus_of(uid) == []
    mine = [e for e in classroom.audit() if e.get("user") == s.name]
    events = [e["event"] for e in mine]
    assert "culled" in events and "start" in events, events
    start = next(e for e in mine if e["event"] == "start")
    assert start["profile"] == "base" and start["vcpus"] == 1 and start["network"] == "none"
    assert start["kernel_id"] == kid and start["vm_id"]


@pytest.mark.timeout(600)
def test_a_student_logs_in_through_the_hub_in_a_real_browser_and_runs_a_cell(classroom):
    """Chromium (Debian's, through Playwright): the hub's login form, the
    student's JupyterLab, a notebook on SmolVM Python, a cell that runs in the VM."""
    from playwright.sync_api import expect, sync_playwright

    from test_browser_e2e import CHROMIUM, CHROMIUM_FLAGS

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: scripts/install-system-deps --test installs it")
    s = classroom.student(2)          # its earlier kernel was culled: within its quota of one VM
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": "import platform; platform.release()",
                     "outputs": [], "execution_count": None}],
          "metadata": {"kernelspec": {"name": "smolvm-python", "display_name": "SmolVM Python",
                                      "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    s.server("PUT", "/api/contents/hello.ipynb", {"type": "notebook", "format": "json", "content": nb})
    name, password = classroom.students[2]
    shots = classroom.folder / "shots"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{classroom.base}/hub/login")
            page.fill("#username_input", name)
            page.fill("#password_input", password)
            page.click("#login_submit")
            page.wait_for_url(f"**/user/{name}/lab**", timeout=120_000)
            page.goto(f"{classroom.base}/user/{name}/lab/tree/hello.ipynb")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-Toolbar-kernelName')]"
                ".some(e => e.textContent.includes('SmolVM'))", timeout=120_000)
            # The kernel's connection must be up before the cell runs. In some runs
            # JupyterLab showed "SmolVM Python | Disconnected" and never sent the
            # cell while the kernel and its VM were up (audit: restored in 0.5 s);
            # a reload connects again. Not yet understood (see the closing note).
            status = ("() => [...document.querySelectorAll('.jp-StatusBar-TextItem, .jp-StatusBar-Item')]"
                      ".some(e => /SmolVM.*Idle/.test(e.textContent))")
            try:
                page.wait_for_function(status, timeout=30_000)
            except Exception:
                page.screenshot(path=str(shots / "hub-disconnected.png"))
                page.reload()
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
                page.wait_for_function(status, timeout=90_000)
            page.locator(".jp-CodeCell .jp-InputArea-editor").first.click()
            page.keyboard.press("Shift+Enter")
            expect(page.locator(".jp-OutputArea-output").first).to_contain_text("cloud-amd64", timeout=180_000)
            page.screenshot(path=str(shots / "hub-student-cell.png"))
        except BaseException:
            page.screenshot(path=str(shots / "hub-failure.png"))
            print((classroom.folder / "hub.log").read_text()[-3000:])
            print("\n".join(json.dumps(e) for e in classroom.audit()[-8:]))
            raise
        finally:
            browser.close()
    starts = [e for e in classroom.audit() if e["event"] == "start" and e.get("user") == name]
    assert len(starts) == 2          # the culled kernel's VM, then this notebook's


HOG = r"""
import sys, time
for _ in range(100):                    # allocate only once inside the student's group
    if "/smolvm-students/" + sys.argv[1] in open("/proc/self/cgroup").read():
        break
    time.sleep(0.1)
else:
    sys.exit(3)
chunks = []
while True:
    chunks.append(b"x" * (32 << 20))
"""


def _oom_kills(name: str) -> int:
    groups = _cgroups_of(os.getpid())
    if "memory" in groups:
        (mount,) = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if " - cgroup " in line and "memory" in line.split(" - ")[1].split()[2].split(",")]
        found = list(Path(mount).rglob(f"smolvm-students/{name}/memory.oom_control"))
    else:
        found = list(Path("/sys/fs/cgroup").rglob(f"smolvm-students/{name}/memory.events"))
    text = found[0].read_text()
    return int(re.search(r"^oom_kill (\d+)$", text, re.M).group(1))


def test_a_students_cpu_spinners_and_memory_hog_stay_in_their_cgroup(classroom):
    """Student 1 spins two CPUs and allocates without bound, as themselves on the
    host (started by root as an su would, then swept into their group): student
    0's `pass` stays under 3x its unloaded round trip plus 1 s, and the hog is
    killed by its group's memory limit (1024 MiB by default), not the host's."""
    s = classroom.student(0)
    kid = getattr(classroom, "kernels", {}).get(s.name)
    if kid is None or not any(k["id"] == kid for k in s.server("GET", "/api/kernels")):
        kid = s.start_kernel()
    for _ in range(2):
        assert s.run_cell(kid, "pass").status == "ok"          # awake (resumed if paused)
    base = statistics.median(s.run_cell(kid, "pass").seconds for _ in range(5))
    other = classroom.students[1][0]
    kills = _oom_kills(other) if list(Path("/sys/fs/cgroup").rglob(f"smolvm-students/{other}")) else 0
    spin = [_as(other, ["/usr/bin/python3", "-c", "while True: pass"]) for _ in range(2)]
    hog = _as(other, ["/usr/bin/python3", "-c", HOG, other])
    try:
        assert wait_for(lambda: all(_in_group(p.pid, _student_group(other)) for p in spin), 5, interval=0.2)
        loaded = []
        for _ in range(5):
            r = s.run_cell(kid, "pass")
            assert r.status == "ok"
            loaded.append(r.seconds)
        code = hog.wait(120)
        assert code == -9, f"the hog ended with {code} (3: never moved into its group)"
        assert _oom_kills(other) > kills
        assert all(p.poll() is None for p in spin)                  # the spinners run on, confined
        assert classroom.hub.poll() is None
        print(f"`pass` round trip: unloaded median {base:.3f} s; beside the spinners and the hog "
              f"{', '.join(f'{x:.3f}' for x in loaded)} s (bound {3 * base + 1:.3f} s)")
        assert max(loaded) < 3 * base + 1, (base, loaded)
    finally:
        for p in [*spin, hog]:
            p.kill()
            p.wait()


def test_a_student_runs_the_course_image_with_its_packages(classroom, course_image):
    """The instructor's path end to end: a course folder's image (tests/vm/conftest.py),
    offered by `classroom up --profile`, shared read-only with the students, run
    by a student's kernel of that kernelspec (their other kernels shut first:
    one VM per student)."""
    from smolvm_kernel.classroom.provision import kernelspec_name

    s = classroom.student(2)
    for k in s.server("GET", "/api/kernels") or []:
        s.server("DELETE", f"/api/kernels/{k['id']}")
    code = ("import tabulate, msgpack, shutil\n"
            "print(tabulate.__version__, msgpack.unpackb(msgpack.packb([1, 2])), bool(shutil.which('jq')))")
    deadline = time.monotonic() + 90
    while True:      # the shut kernels' grants go back as their VMs stop
        kid = s.start_kernel(kernelspec_name(course_image.profile))
        r = s.run_cell(kid, code)
        if r.status == "ok" or "refused" not in r.text or time.monotonic() > deadline:
            break
        s.server("DELETE", f"/api/kernels/{kid}")
        time.sleep(2)
    assert r.status == "ok", r.text
    assert r.text.split() == ["0.9.0", "[1,", "2]", "True"], r.text
