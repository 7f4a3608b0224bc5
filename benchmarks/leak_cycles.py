"""Start/execute/stop cycles and kernel restarts: what is left behind, counted.

    python benchmarks/leak_cycles.py [--cycles 100] [--restarts 100]

Part 1 runs ``--cycles`` times: a Sandbox starts (from the ready snapshot),
runs a cell, stops. Part 2 starts one SmolVM kernel and restarts it
``--restarts`` times (a new kernel process and VM each time), running a cell
after each. Part 3 replaces one kernel's VM ``--restarts`` times with
``%smolvm reset`` (the same kernel process throughout). Before and after each
part it counts what a VM can leave on the host: QEMU processes, open file
descriptors (this process; in part 3 the kernel's), files in the state
directory (run folders, sockets), rows in the VM registry, and in part 3 the
kernel process's RSS. A VMM that exited but was never waited for (a zombie)
counts as a QEMU process left behind, and is also counted on its own row.

Prints a table; exit status 1 if a count grew, if the open file descriptors
grew by more than FD_SLACK (a per-cycle leak of one fd shows within a few
cycles), or if the kernel process's RSS grew by more than RSS_SLACK_MIB (the
allocator's own growth, caches filled once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _vm_cgroup_dirs() -> set[str]:
    from smolvm_kernel.host import cgroups

    where = cgroups.probe()
    if isinstance(where, str):
        return set()
    return {str(d) for parent in set(where.parents.values()) if parent.is_dir()
            for d in parent.iterdir() if d.is_dir() and cgroups._VM_DIR.match(d.name)}


#: Growth of open fds and of the kernel's RSS that is not a leak (see the docstring).
FD_SLACK = 2
RSS_SLACK_MIB = 24


def _qemu_procs() -> dict[str, str]:
    """pid -> state (R, S, Z, ...) of every QEMU process, zombies included (a
    zombie has no command line, so it is found by its name, not by pgrep -f)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition("(")[2].rpartition(")")
        if name.startswith("qemu-system"):
            out[d.name] = rest.split()[0]
    return out


#: QEMU processes and VM cgroups that existed before this run (other kernels'
#: live VMs, e.g. a test session's shared VM): not ours to count.
_OTHER_QEMU: set[str] = set()
_OTHER_CGROUPS: set[str] = set()


def counts(kernel_pid: int | None = None) -> dict[str, int]:
    from smolvm_kernel import paths
    from smolvm_kernel.host.registry import Registry

    state = paths.state_dir()
    ours = {pid: st for pid, st in _qemu_procs().items() if pid not in _OTHER_QEMU}
    out = {
        "QEMU processes": len(ours),
        "zombie QEMU processes": sum(1 for st in ours.values() if st == "Z"),
        "open fds (this process)": len(os.listdir("/proc/self/fd")),
        # The audit log (audit.jsonl, its lock and rotations) is kept on purpose.
        "files in the state dir": sum(len([x for x in f if not x.startswith("audit.jsonl")]) + len(d)
                                      for _, d, f in os.walk(state)) if state.exists() else 0,
        "VM registry rows": len(Registry().list()),
        "VM cgroups": len(_vm_cgroup_dirs() - _OTHER_CGROUPS),
    }
    if kernel_pid:
        out["open fds (kernel process)"] = len(os.listdir(f"/proc/{kernel_pid}/fd"))
        for line in Path(f"/proc/{kernel_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["kernel process RSS (MiB)"] = int(line.split()[1]) // 1024
    return out


def sandbox_cycles(n: int) -> float:
    from smolvm_kernel.vm.sandbox import Sandbox

    t = time.monotonic()
    for i in range(n):
        sb = Sandbox(backend="qemu")
        sb.start()
        out = "".join(o.text for o in sb.execute(f"print({i} * 2)"))
        assert out.strip() == str(i * 2), out
        sb.stop()
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=100)
    args = ap.parse_args()
    _OTHER_QEMU.update(_qemu_procs())
    _OTHER_CGROUPS.update(_vm_cgroup_dirs())
    from jupyter_client.manager import start_new_kernel

    rows = []
    sandbox_cycles(1)      # the snapshot exists, lazily opened files are open
    before = counts()
    took = sandbox_cycles(args.cycles)
    after = counts()
    rows += [(f"{args.cycles} Sandbox start/execute/stop cycles ({took:.0f} s)", k, before[k], after[k])
             for k in before]

    km, kc = start_new_kernel(kernel_name="smolvm-python", startup_timeout=120)
    quiet = {"timeout": 120, "output_hook": lambda m: None}
    try:
        kc.execute_interactive("pass", **quiet)
        before = counts()
        t = time.monotonic()
        for i in range(args.restarts):
            km.restart_kernel(now=False)
            kc.wait_for_ready(timeout=120)
            kc.execute_interactive(f"x = {i}", **quiet)
        took = time.monotonic() - t
        after = counts()
        rows += [(f"{args.restarts} restarts of one kernel ({took:.0f} s)", k, before[k], after[k])
                 for k in before]
        pid = km.provisioner.process.pid
        kc.execute_interactive("%smolvm reset", **quiet)
        kc.execute_interactive("pass", **quiet)
        before = counts(pid)
        t = time.monotonic()
        for i in range(args.restarts):
            kc.execute_interactive("%smolvm reset", **quiet)
            kc.execute_interactive(f"x = {i}", **quiet)
        took = time.monotonic() - t
        after = counts(pid)
        rows += [(f"{args.restarts} `%smolvm reset` in one kernel process ({took:.0f} s)", k, before[k], after[k])
                 for k in before]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    time.sleep(2)
    final = counts()
    print("\n| run | what | before | after |\n|---|---|---|---|")
    for run, what, b, a in rows:
        print(f"| {run} | {what} | {b} | {a} |")
    print(f"\nafter both and the kernel's shutdown: {final}")
    def leaked(what: str, b: int, a: int) -> bool:
        if "RSS" in what:
            return a - b > RSS_SLACK_MIB
        if "fds" in what:
            return a - b > FD_SLACK
        return a > b

    grew = [r for r in rows if leaked(r[1], r[2], r[3])]
    for run, what, b, a in grew:
        print(f"LEAK: {run}: {what} {b} -> {a}")
    if final.get("QEMU processes") or final.get("zombie QEMU processes"):
        print(f"LEAK: QEMU processes after the kernel's shutdown: {final}")
        return 1
    return 1 if grew else 0


if __name__ == "__main__":
    sys.exit(main())
