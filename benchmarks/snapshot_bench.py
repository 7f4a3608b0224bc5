"""Ready snapshots vs a local ipykernel, side by side in one run.

    python benchmarks/snapshot_bench.py [--kernels 10] [--ksm SECONDS]

Rows: launch -> first execute_result (local, SmolVM from snapshot, SmolVM
cold) and their ratio, the median of --launches alternating launches; restart -> ready; N kernels started at once -> all
ready; host memory (PSS) per idle kernel with N running; snapshot build time
and size, measured in this run (a snapshot built afresh into a folder of its
own, the shared one untouched). With --ksm S (root), kernel samepage merging is switched on for S
seconds and the PSS measured again, then restored to its previous setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jupyter_client.manager import start_new_kernel

from smolvm_kernel.host.registry import Registry
from smolvm_kernel.vm.snapshot import SnapshotCache


def first_result(kernel_name: str, env: dict | None = None):
    t0 = time.monotonic()
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=300,
                              **({"env": env} if env else {}))
    kc.execute_interactive("6*7", timeout=300, output_hook=lambda m: None)
    return time.monotonic() - t0, km, kc


def close(km, kc) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def kernel_tree_pss(km) -> int:
    """PSS of the kernel process, its VMM and the VMM's watchdog."""
    pid = km.provisioner.process.pid
    total = pss_kib(pid)
    for rec in Registry().list():
        if rec.owner_pid == pid and rec.vmm_pid:
            total += pss_kib(rec.vmm_pid)
    return total


def build_row() -> tuple[str, str, str, str]:
    """Build the base snapshot of the default shape now, into a folder of its
    own, and report what that build took (not a manifest left by an earlier run)."""
    import tempfile

    from smolvm_kernel.vm.sandbox import Sandbox

    with tempfile.TemporaryDirectory(prefix="smolvm-bench-snap-") as folder:
        old = os.environ.get("SMOLVM_SNAPSHOT_DIR")
        os.environ["SMOLVM_SNAPSHOT_DIR"] = folder
        try:
            t = time.monotonic()
            sb = Sandbox(backend="qemu", snapshot="wait")
            sb.start()
            took = time.monotonic() - t
            sb.stop()
            (m,) = [snap.manifest() for snap in SnapshotCache().list()]
        finally:
            if old is None:
                os.environ.pop("SMOLVM_SNAPSHOT_DIR", None)
            else:
                os.environ["SMOLVM_SNAPSHOT_DIR"] = old
    ram = m.get("ram_file_bytes")
    return ("snapshot build (template boot + save), built in this run", "-",
            f"{m['boot_s'] + m['save_s']:.1f} s (first start that waited for it: {took:.1f} s)",
            f"device state {m['state_bytes'] / 2**10:.0f} KiB" +
            (f" + RAM file {ram / 2**20:.0f} MiB on disk, shared by all forks" if ram else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=10)
    ap.add_argument("--launches", type=int, default=5,
                    help="launches of each kernel, alternating, for the first row (median)")
    ap.add_argument("--kernel", default="smolvm-python")
    ap.add_argument("--ksm", type=float, default=0, help="seconds of KSM merging (root)")
    args = ap.parse_args()
    rows = []

    # Warm: make sure the snapshot exists (built once per shape).
    warm, km, kc = first_result(args.kernel)
    close(km, kc)
    # Alternate the two kernels so that both see the same machine.
    local_runs, snap_runs = [], []
    for _ in range(args.launches):
        for runs, name in ((local_runs, "python3"), (snap_runs, args.kernel)):
            t, km, kc = first_result(name)
            runs.append(t)
            if name == "python3":
                local_pss = pss_kib(km.provisioner.process.pid)
            close(km, kc)
    local, snap_t = statistics.median(local_runs), statistics.median(snap_runs)
    km, kc = start_new_kernel(kernel_name=args.kernel, startup_timeout=300)
    kc.execute_interactive("6*7", timeout=300, output_hook=lambda m: None)
    t = time.monotonic()
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=120)
    kc.execute_interactive("6*7", timeout=120, output_hook=lambda m: None)
    restart = time.monotonic() - t
    close(km, kc)
    cold, km, kc = first_result(args.kernel, env={**os.environ, "SMOLVM_SNAPSHOT": "off"})
    close(km, kc)
    rows += [(f"launch -> first execute_result, median of {args.launches}",
              f"{local:.2f} s ({min(local_runs):.2f}-{max(local_runs):.2f})",
              f"{snap_t:.2f} s ({min(snap_runs):.2f}-{max(snap_runs):.2f}; cold: {cold:.1f} s)",
              f"{snap_t / local:.2f}x")]
    rows += [("restart -> first execute_result", "-", f"{restart:.2f} s", "")]

    t = time.monotonic()
    with ThreadPoolExecutor(args.kernels) as pool:
        started = list(pool.map(lambda _: first_result(args.kernel), range(args.kernels)))
    all_ready = time.monotonic() - t
    rows += [(f"{args.kernels} kernels started at once -> all ready", "-", f"{all_ready:.2f} s",
              f"slowest {max(s[0] for s in started):.2f} s")]
    time.sleep(5)
    pss = [kernel_tree_pss(km) for _, km, _ in started]
    rows += [(f"PSS per idle kernel, {args.kernels} running", f"{local_pss / 1024:.0f} MiB",
              f"{statistics.mean(pss) / 1024:.0f} MiB", "kernel + VMM")]
    if args.ksm:
        run = Path("/sys/kernel/mm/ksm/run")
        before = run.read_text().strip()
        try:
            run.write_text("1")
            Path("/sys/kernel/mm/ksm/pages_to_scan").write_text("10000")
            time.sleep(args.ksm)
            pss = [kernel_tree_pss(km) for _, km, _ in started]
            rows += [(f"... after {args.ksm:.0f} s of KSM", "-", f"{statistics.mean(pss) / 1024:.0f} MiB", "")]
        finally:
            run.write_text(before)
    for _, km, kc in started:
        close(km, kc)

    rows += [build_row()]
    print(f"\n| figure | local python3 | {args.kernel} | note |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
