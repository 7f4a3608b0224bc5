"""PID 1 of the guest after switch_root: finish the mounts, start the agent, reap.

When the agent exits (shutdown requested, or it crashed) the VM restarts,
which the VMM turns into an exit (``-no-reboot``): the host then sees the VM
end rather than a guest with nobody answering.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import sys

_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_RB_AUTOBOOT = 0x01234567


_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8


def _mount(source: str, target: str, fstype: str, options: str = "",
           flags: int = _MS_NOSUID | _MS_NODEV) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(target, exist_ok=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                  options.encode() or None) != 0:
        err = ctypes.get_errno()
        print(f"smolvm-init: mount {target}: {os.strerror(err)}", file=sys.stderr)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", _IFF_UP))


HOSTNAME = "smolvm"


def _name_files() -> None:
    """Resolve the VM's own name and localhost from /etc/hosts, never through DNS:
    ipykernel looks its host name up at start, and with a NIC whose nameserver
    does not answer that lookup waited for DNS time-outs before the kernel was
    ready. A networked VM's seed rewrites resolv.conf with its nameservers."""
    with open("/etc/hosts", "w") as fh:
        fh.write(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
                 "::1\tlocalhost ip6-localhost ip6-loopback\n")
    from smolvm_guest import seed

    seed.write_resolv_conf([])     # a networked VM's seed writes its servers later


def _protect_links() -> None:
    """Set the kernel's link and FIFO protections explicitly (not by the
    distribution's defaults): links in sticky folders such as /tmp are
    followed only for their owner, no hard link to a file one cannot write."""
    for name, value in (("protected_symlinks", "1"), ("protected_hardlinks", "1"),
                        ("protected_fifos", "2"), ("protected_regular", "2")):
        try:
            with open(f"/proc/sys/fs/{name}", "w") as fh:
                fh.write(value)
        except OSError as exc:
            print(f"smolvm-init: fs.{name}: {exc}", file=sys.stderr)


def _restart_vm() -> None:
    os.sync()
    ctypes.CDLL(None).reboot(_RB_AUTOBOOT)


def _apply_seed() -> list[str] | None:
    """The vsock link's secret, network and SSH keys from the seed disk; the SSH
    server's argv, if any."""
    try:
        from smolvm_guest import seed

        data = seed.read_seed()
        if not data:
            return None
        if data.get("link_secret"):
            seed.install_link_secret(data["link_secret"])
        if data.get("net"):
            seed.configure_network(data["net"])
        if data.get("ssh"):
            return seed.install_ssh(data["ssh"])
    except Exception as exc:  # the host sees the VM never answer, and the console says why
        print(f"smolvm-init: applying the seed failed: {exc}", file=sys.stderr)
    return None


def main() -> None:
    # PID 1 runs isolated (-I): the guest package is not on its path.
    if "/opt/smolvm" not in sys.path:
        sys.path.insert(0, "/opt/smolvm")
    _mount("tmpfs", "/run", "tmpfs", "mode=0755")
    _mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777")
    _mount("devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666", flags=_MS_NOSUID)
    _mount("cgroup2", "/sys/fs/cgroup", "cgroup2", flags=_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.chmod("/tmp", 0o1777)
    socket.sethostname(HOSTNAME)
    _protect_links()
    try:
        _name_files()
    except Exception as exc:   # the VM still boots; its console says what failed
        print(f"smolvm-init: /etc/hosts, resolv.conf: {exc}", file=sys.stderr)
    try:
        _loopback_up()
    except OSError as exc:
        print(f"smolvm-init: lo: {exc}", file=sys.stderr)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONPATH": "/opt/smolvm", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    os.environ.update(env)
    essential = {}
    sshd = _apply_seed()
    # faulthandler: a crash of the agent (SIGSEGV, SIGABRT) prints every thread's Python
    # stack on the console, which the host attaches to the death it reports.
    agent = subprocess.Popen([sys.executable, "-u", "-X", "faulthandler", "-m", "smolvm_guest.agent"], env=env)
    essential[agent.pid] = "agent"
    if sshd:
        essential[subprocess.Popen(sshd, env=env).pid] = "dropbear"
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid in essential:
            print(f"smolvm-init: {essential[pid]} exited ({status}); restarting the VM", file=sys.stderr)
            break
    _restart_vm()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback
        traceback.print_exc()   # to the console, before the VM goes away
        sys.stderr.flush()
    finally:
        _restart_vm()
