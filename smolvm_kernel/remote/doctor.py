"""`smolvm-kernel doctor --hosts`: each host of a gateway, checked over SSH, one line each.

A host is asked, with the same SSH set-up a gateway's provisioner uses (the
user's key, host keys pinned in its known_hosts, unknown hosts refused), to
run ``smolvm-kernel doctor --json``: this package's version, its images and
ready snapshots, the accelerator it would use and whether its admission
service would start a VM now.
"""

from __future__ import annotations

import json
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SSH_TIMEOUT_S = 5.0


def summary() -> dict:
    """This host's facts for a gateway (``doctor --json``)."""
    from smolvm_kernel._version import __version__
    from smolvm_kernel.backends.accel import choose_accel
    from smolvm_kernel.backends.qemu import find_qemu
    from smolvm_kernel.config import SandboxConfig
    from smolvm_kernel.errors import SmolVMError
    from smolvm_kernel.host.admission import admission_answer
    from smolvm_kernel.images import ImageCache
    from smolvm_kernel.vm.snapshot import SnapshotCache

    out: dict = {"version": __version__}
    images = ImageCache().list()
    out["images"] = sorted({i.profile for i in images})
    current = {i.key for i in images}
    out["snapshots"] = sum(1 for s in SnapshotCache().list() if s.manifest().get("image") in current)
    try:
        cfg = SandboxConfig().validated()
        out["accel"] = choose_accel(cfg.accel, find_qemu(cfg.qemu_path), images[0]).name if images else None
        out["admission"] = admission_answer(SandboxConfig().validated())
    except SmolVMError as exc:
        out["error"] = str(exc).splitlines()[0]
    return out


def check(host: str, user: str | None, command: str, port: int = 22) -> tuple[str, str]:
    """One host's state (ok, FULL, DOWN, BAD) and line."""
    import paramiko

    ssh = paramiko.SSHClient()
    ssh.load_system_host_keys()
    ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        ssh.connect(host, port=port, username=user, timeout=SSH_TIMEOUT_S, banner_timeout=SSH_TIMEOUT_S,
                    auth_timeout=SSH_TIMEOUT_S)
        _, stdout, _ = ssh.exec_command(command, timeout=120)
        text = stdout.read().decode(errors="replace").strip().splitlines()
    except Exception as exc:       # every failure is this host's line, not the command's end
        reason = type(exc).__name__ if not str(exc) else str(exc)
        return "DOWN", f"{host:<16} DOWN  cannot reach it over SSH: {reason}"
    finally:
        ssh.close()
    try:
        facts = json.loads(text[-1])
    except (IndexError, ValueError):
        return "BAD", f"{host:<16} BAD   `{command}` answered {' '.join(text)[-200:]!r}"
    if facts.get("error"):
        return "BAD", f"{host:<16} BAD   smolvm-kernel {facts.get('version')}: {facts['error']}"
    full = not str(facts.get("admission", "")).startswith("ok")
    state = "FULL" if full else ("ok" if facts.get("images") and facts.get("snapshots") else "BAD")
    return state, (f"{host:<16} {state:<5} smolvm-kernel {facts.get('version')}, images {','.join(facts.get('images') or []) or 'none'}, "
            f"{facts.get('snapshots')} ready snapshots, accelerator {facts.get('accel')}, "
            f"admission {facts.get('admission')}")


def doctor_hosts(hosts: list[str], user: str | None) -> int:
    cli = Path(sys.executable).with_name("smolvm-kernel")
    command = f"{shlex.quote(str(cli))} doctor --json"
    with ThreadPoolExecutor(min(8, len(hosts))) as pool:
        results = list(pool.map(lambda h: check(h, user, command), hosts))
    for _, line in results:
        print(line)
    return 0 if all(state in ("ok", "FULL") for state, _ in results) else 1
