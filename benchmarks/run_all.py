"""Every table of the README's performance section, in one run, with the machine it ran on.

    python benchmarks/run_all.py [--quick] [--no-transport] > results.md

Runs, one after another (each against a local ipykernel in the same run):
snapshot_bench (launch, restart, many kernels, memory, snapshot build),
launch_timeline (where a start's time goes, mark by mark), kernel_bench (round trips, output, first cell and first interrupt after a
start), workdir_bench (what the notebook's folder adds to a start), checkpoint_bench (checkpoint,
restore, undo, fork against a local kernel's restart and re-run), transport_bench (virtio-serial vs SSH; needs root for its network
namespace, skipped with a note otherwise), boot_loop (cold boots) and
leak_cycles (what 100 start/stop cycles, restarts and resets leave behind). It
prints a header naming the machine (CPU, cores, memory, kernel, accelerator
and why, QEMU) and the date, then each script's table as it printed it. The
README quotes only what this printed, with that header.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> list[str]:
    """Lines that identify the machine and its accelerator."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"machine: {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
             f"{platform.system()} {platform.release()}, Python {platform.python_version()}"]
    try:
        from smolvm_kernel.backends.accel import choose_accel
        from smolvm_kernel.backends.qemu import find_qemu
        from smolvm_kernel.config import SandboxConfig
        from smolvm_kernel.images import ImageCache

        cfg = SandboxConfig()
        qemu = find_qemu(cfg.qemu_path)
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        choice = choose_accel(cfg.accel, qemu, ImageCache().get("base"))
        lines += [f"VMM: {version}", f"accelerator: {choice.name} ({choice.reason})"]
    except Exception as exc:   # the header still prints; the benchmarks will say what is missing
        lines.append(f"accelerator: unknown ({type(exc).__name__}: {exc})")
    return lines


def run(script: str, *args: str) -> int:
    print(f"\n### `python benchmarks/{script} {' '.join(args)}`".rstrip() + "\n", flush=True)
    t = time.monotonic()
    # Kernels start in their notebook's folder, which SmolVM copies into the VM
    # (vm/workdir.py): each script runs in an empty one, a fresh notebook's, not
    # in the repository (workdir_bench.py measures the folder's cost itself).
    with tempfile.TemporaryDirectory(prefix="smolvm-bench-notebook-") as folder:
        proc = subprocess.run([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True,
                              cwd=folder)
    table = [line for line in proc.stdout.splitlines() if line.strip()]
    print("\n".join(table))
    print(f"\n({time.monotonic() - t:.0f} s{'' if proc.returncode == 0 else f', exit status {proc.returncode}'})",
          flush=True)
    return proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer kernels, launches and rounds")
    ap.add_argument("--no-transport", action="store_true", help="leave out transport_bench")
    args = ap.parse_args()
    print("## Benchmarks\n")
    for line in machine():
        print(f"- {line}")
    quick = args.quick
    failed = 0
    failed |= run("snapshot_bench.py", "--kernels", "4" if quick else "10", "--launches", "3" if quick else "9")
    failed |= run("launch_timeline.py", "--launches", "3" if quick else "7")
    failed |= run("kernel_bench.py", "--rounds", "50" if quick else "200",
                  "--first-use-runs", "1" if quick else "3")
    failed |= run("workdir_bench.py", "--launches", "2" if quick else "5", "--rounds", "50" if quick else "100")
    failed |= run("checkpoint_bench.py", "--repeats", "1" if quick else "3", "--rounds", "10" if quick else "30",
                  "--forks", "3" if quick else "10")
    if args.no_transport:
        pass
    elif os.geteuid() != 0:
        print("\n### transport_bench.py\n\nnot run: it needs root for its network namespace")
    else:
        failed |= run("transport_bench.py")
    failed |= run("boot_loop.py", "--count", "5" if quick else "20")
    failed |= run("leak_cycles.py", "--cycles", "10" if quick else "100", "--restarts", "10" if quick else "100")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
