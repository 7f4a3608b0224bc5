"""The Sandbox against real microVMs (QEMU; TCG on hosts without usable KVM)."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from smolvm_kernel.errors import ExecutionTimeout, GuestDied, GuestFileError
from smolvm_kernel.vm.sandbox import SandboxState


def run(sb, code, **kw):
    return list(sb.execute(code, **kw))


def texts(outputs, kind=None):
    return "".join(o.text for o in outputs if kind is None or o.type == kind)


def test_state_persists_across_executions(sandbox):
    assert texts(run(sandbox, "x = 6 * 7\nx"), "execute_result") == "42"
    assert texts(run(sandbox, "x + 1"), "execute_result") == "43"


def test_guest_runs_its_own_kernel(sandbox, image):
    release = texts(run(sandbox, "import os; print(os.uname().release)"))
    assert release.strip() == image.kernel_release
    assert sandbox.kernel_info["language_info"]["name"] == "python"


def test_stdout_and_stderr_stream_in_order_as_they_happen(sandbox):
    code = textwrap.dedent("""
        import sys, time
        print("one", flush=True)
        time.sleep(0.3)
        print("two", file=sys.stderr, flush=True)
        time.sleep(0.3)
        print("three", flush=True)
        time.sleep(1.5)
        print("four", flush=True)
    """)
    seen = []
    for out in sandbox.execute(code):
        seen.append((out.name, out.text.strip(), time.monotonic()))
    assert [(n, t) for n, t, _ in seen] == [("stdout", "one"), ("stderr", "two"),
                                            ("stdout", "three"), ("stdout", "four")]
    # "three" reached us before the cell finished sleeping: outputs stream.
    assert seen[3][2] - seen[2][2] > 1.0


def test_exception_comes_back_as_error_with_traceback(sandbox):
    outs = run(sandbox, "def f():\n    return 1/0\nf()")
    errors = [o for o in outs if o.type == "error"]
    assert len(errors) == 1
    err = errors[0].content
    assert err["ename"] == "ZeroDivisionError"
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in err["traceback"]]
    assert any("return 1/0" in line for line in plain)


def test_rich_output(sandbox):
    outs = run(sandbox, "from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))")
    assert outs[0].type == "display_data"
    assert outs[0].content["data"]["text/html"] == "<b>hi</b>"


def test_interrupt_stops_a_tight_loop(sandbox):
    result = {}

    def consume():
        result["outs"] = run(sandbox, "while True: pass")

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    sandbox.interrupt()
    t.join(10)
    assert not t.is_alive(), "the loop did not stop within 10 s of the interrupt"
    assert [o.content["ename"] for o in result["outs"] if o.type == "error"] == ["KeyboardInterrupt"]
    assert time.monotonic() - t0 < 10
    assert texts(run(sandbox, "x"), "execute_result") == "42"   # state survived


def test_per_call_timeout_interrupts(sandbox):
    t0 = time.monotonic()
    with pytest.raises(ExecutionTimeout) as info:
        run(sandbox, "import time; time.sleep(1000)", timeout=2)
    assert info.value.reset is False
    assert time.monotonic() - t0 < 2 + 10
    assert sandbox.state == SandboxState.READY
    assert texts(run(sandbox, "x"), "execute_result") == "42"


def test_stats_report_the_configured_shape(sandbox):
    stats = sandbox.stats()
    assert stats["vcpus"] == 2
    # MemTotal is the configured size less what the guest kernel reserves.
    assert 400 * 1024 < stats["mem_total_kib"] <= 512 * 1024
    assert stats["backend"] == "qemu" and stats["accel"] in ("kvm", "tcg")
    assert stats["accel_reason"]
    assert stats["disk_total_bytes"] > 1e9 and stats["uptime_s"] > 0
    assert stats["network"] == "none"


def test_guest_has_no_network_but_loopback(sandbox):
    out = texts(run(sandbox, "import os; print(sorted(os.listdir('/sys/class/net')))"))
    assert out.strip() == "['lo']"


def test_host_files_are_not_visible(sandbox, tmp_path):
    canary = tmp_path / f"canary-{secrets.token_hex(8)}"
    canary.write_text("host secret")
    code = (f"import os; print(os.path.exists({str(canary)!r}), os.path.exists({str(Path.cwd())!r}),"
            f" os.path.exists('/root/.cache/smolvm-kernel'))")
    assert texts(run(sandbox, code)).strip() == "False False False"


def test_guest_code_runs_unprivileged(sandbox):
    """The kernel's user (uid 1000) can neither open the agent's channel device
    (so it cannot write forged frames to the host), nor list the agent's run
    folder, nor lift its own limits or leave its cgroup."""
    out = texts(run(sandbox, """
import glob, os
def attempt(fn):
    try:
        fn()
        return 'allowed'
    except PermissionError:
        return 'denied'
port = [p for p in glob.glob('/sys/class/virtio-ports/*')
        if open(p + '/name').read().strip() == 'org.smolvm.agent.0']
dev = '/dev/' + os.path.basename(port[0])
def write(path, value):
    with open(path, 'w') as fh:
        fh.write(value)
print(os.getuid(), os.path.exists(dev),
      attempt(lambda: os.close(os.open(dev, os.O_RDWR))),
      attempt(lambda: os.listdir('/run/smolvm')),
      attempt(lambda: write('/sys/fs/cgroup/kernel/pids.max', 'max')),
      attempt(lambda: write('/sys/fs/cgroup/cgroup.procs', str(os.getpid()))))
"""))
    assert out.split() == ["1000", "True", "denied", "denied", "denied", "denied"], out


def test_file_put_and_get(sandbox):
    payload = os.urandom(3 * 1024 * 1024 + 17)   # several chunks
    sandbox.put_file(payload, "data/blob.bin")
    out = texts(run(sandbox, "import hashlib; print(hashlib.sha256(open('data/blob.bin','rb').read()).hexdigest())"))
    import hashlib
    assert out.strip() == hashlib.sha256(payload).hexdigest()
    assert sandbox.get_file("data/blob.bin") == payload
    assert sandbox.get_file("~/data/blob.bin") == payload     # "~" is the guest user's home
    sandbox.put_file(b"t", "~/t.txt")
    assert sandbox.get_file("/home/user/t.txt") == b"t"
    with pytest.raises(GuestFileError, match="outside"):
        sandbox.get_file("/etc/shadow")
    # the audit log has the VM's start and each transfer with its size
    mine = [e for e in sandbox.audit.read() if e.get("vm_id") == sandbox.vm_id]
    start = next(e for e in mine if e["event"] == "start")
    assert (start["vcpus"], start["mem_mib"], start["network"], start["backend"]) == (2, 512, "none", "qemu")
    assert [(e["event"], e["path"], e["bytes"]) for e in mine if e["event"] in ("push", "pull")][:3] == [
        ("push", "data/blob.bin", len(payload)), ("pull", "data/blob.bin", len(payload)),
        ("pull", "~/data/blob.bin", len(payload))]


def test_pull_is_limited_and_writes_whole_files_only(sandbox, tmp_path):
    """A pull over its limit writes nothing (not even a partial file); one
    within it lands whole, under its name, through a temporary file."""
    from smolvm_kernel.jupyter import transfer

    payload = os.urandom(2 * 1024 * 1024 + 5)
    sandbox.put_file(payload, "pull/big.bin")
    with pytest.raises(GuestFileError, match="limit"):
        transfer.pull(sandbox, tmp_path, "pull/big.bin", None, limit=1024 * 1024)
    assert list(tmp_path.iterdir()) == []
    summary = transfer.pull(sandbox, tmp_path, "pull/big.bin", None, limit=4 * 1024 * 1024)
    assert "pulled" in summary and [p.name for p in tmp_path.iterdir()] == ["big.bin"]
    assert (tmp_path / "big.bin").read_bytes() == payload


def test_the_vmm_runs_unprivileged(sandbox):
    """Checked on the running QEMU, not only in its argv: started as root, it
    has dropped to nobody (every uid of it), and it sits in its own cgroup."""
    status = Path(f"/proc/{sandbox.backend.pid}/status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    if os.geteuid() == 0:
        import pwd

        assert set(uids) == {str(pwd.getpwnam("nobody").pw_uid)}, uids
    else:
        assert set(uids) == {str(os.geteuid())}, uids
    from smolvm_kernel.host import cgroups

    if not isinstance(cgroups.probe(), str):      # a writable hierarchy: the VMM is in it
        assert "/smolvm/" in Path(f"/proc/{sandbox.backend.pid}/cgroup").read_text()


def test_an_output_over_the_hosts_message_limit_is_dropped_in_the_vm_with_a_note(sandbox_factory):
    """The host's limit reaches the agent in the hello: with max_message_bytes at
    128 KiB, a 200 KB output is dropped in the VM and the cell says so; the VM
    lives on (before, the oversized frame ended the channel and the VM)."""
    sb = sandbox_factory(max_message_bytes=128 * 1024)
    outs = list(sb.execute("print('x' * 200_000)"))
    texts = [o.text for o in outs if o.type == "stream"]
    assert any("was dropped in the VM: it exceeds the 131072-byte message limit" in t for t in texts), texts
    assert not any("x" * 1000 in t for t in texts)
    assert sb.state.value == "ready"
    assert "".join(o.text for o in sb.execute("print('next')") if o.type == "stream") == "next\n"


def test_reset_gives_a_clean_vm(sandbox):
    run(sandbox, "open('/home/user/marker', 'w').write('x'); y = 1")
    old_id = sandbox.vm_id
    sandbox.reset()
    assert sandbox.vm_id != old_id
    out = texts(run(sandbox, "import os; print(os.path.exists('/home/user/marker'), 'y' in globals())"))
    assert out.strip() == "False False"


def test_vm_death_mid_cell_is_reported_and_reset_recovers(sandbox):
    result = {}

    def consume():
        try:
            run(sandbox, "import time; time.sleep(60)")
        except GuestDied as exc:
            result["error"] = exc

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(1.0)
    os.kill(sandbox.backend.pid, signal.SIGKILL)
    t.join(10)
    assert not t.is_alive()
    assert "exited" in str(result["error"]) and "reset()" in str(result["error"])
    assert sandbox.state == SandboxState.DEAD
    dead_vm = sandbox.vm_id
    deaths = [e for e in sandbox.audit.read() if e["event"] == "death" and e["vm_id"] == dead_vm]
    assert len(deaths) == 1 and "exited" in deaths[0]["cause"]
    with pytest.raises(GuestDied):
        run(sandbox, "1")
    sandbox.reset()
    assert texts(run(sandbox, "1 + 1"), "execute_result") == "2"


OWNER_SCRIPT = """
import sys, time
from smolvm_kernel import Sandbox
sb = Sandbox(vcpus=1, mem_mib=256, backend="qemu")
sb.start()
print(sb.backend.pid, sb.backend.spec.run_dir,
      *(sb.backend.spec.cgroup.dirs if sb.backend.spec.cgroup else ()), flush=True)
time.sleep(600)
"""


def test_killed_owner_leaves_no_vmm_and_cleanup_leaves_nothing(image, state_dir):
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE,
                             text=True, env=os.environ.copy())
    try:
        line = owner.stdout.readline().split()
        assert line, "the owner process did not start a VM"
        vmm_pid, run_dir, groups = int(line[0]), Path(line[1]), [Path(d) for d in line[2:]]
        assert run_dir.is_dir() and all(d.is_dir() for d in groups)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{vmm_pid}").exists():
        stat = Path(f"/proc/{vmm_pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "Z":
            break
        time.sleep(0.1)
    alive = Path(f"/proc/{vmm_pid}").exists() and \
        Path(f"/proc/{vmm_pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    assert not alive, "the VMM outlived its owner"
    # Its cgroup goes too, with no other process's help (the watchdog removes it).
    while time.monotonic() < deadline and any(d.exists() for d in groups):
        time.sleep(0.1)
    assert not any(d.exists() for d in groups), "the VMM's cgroup outlived its owner"
    cli = [sys.executable, "-m", "smolvm_kernel.cli"]
    first = subprocess.run([*cli, "cleanup"], capture_output=True, text=True, check=True).stdout
    assert str(run_dir) in first
    assert not run_dir.exists()
    second = subprocess.run([*cli, "cleanup"], capture_output=True, text=True, check=True).stdout
    assert second.strip() == "nothing to clean up"
    assert list(Path(state_dir, "vms").iterdir()) == [] or all(
        p.name != run_dir.name for p in Path(state_dir, "vms").iterdir())


def test_boot_timeout_reports_the_console_and_leaves_nothing(image, state_dir):
    from smolvm_kernel.errors import BootTimeout
    from smolvm_kernel.vm.sandbox import Sandbox

    before = set(Path(state_dir, "vms").iterdir())
    sb = Sandbox(backend="qemu", boot_timeout=5, snapshot="off")
    with pytest.raises(BootTimeout) as info:
        sb.start()
    msg = str(info.value)
    assert "SMOLVM_BOOT_TIMEOUT" in msg and "guest console" in msg
    assert sb.state == SandboxState.STOPPED
    assert set(Path(state_dir, "vms").iterdir()) == before


def test_missing_qemu_says_what_to_install(image):
    from smolvm_kernel.errors import ToolNotFound
    from smolvm_kernel.vm.sandbox import Sandbox

    with pytest.raises(ToolNotFound, match="qemu-system-x86 .Debian.*SMOLVM_QEMU"):
        Sandbox(backend="qemu", qemu_path="/nonexistent/qemu-system-x86_64").start()
