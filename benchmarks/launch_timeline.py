"""Where a SmolVM kernel's start goes, milestone by milestone, next to a local ipykernel.

    python benchmarks/launch_timeline.py [--launches 7] [--kernel smolvm-python]

Each launch runs jupyter_client's start_new_kernel and one `6*7` cell, as
snapshot_bench does, alternating a local python3 kernel and the SmolVM one.
The SmolVM kernel records its own marks (SMOLVM_TIMELINE, see
smolvm_kernel/timeline.py): the launcher's exec, ports listening, imports,
the VM's restore, the guest's hello and ready, the first cell in and out.
Prints the median of each mark in ms after the client launched the kernel,
with the range, and the same client-side marks for the local kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from jupyter_client.manager import start_new_kernel


def launch(kernel: str, timeline_file: str | None) -> dict[str, float]:
    env = {**os.environ, **({"SMOLVM_TIMELINE": timeline_file} if timeline_file else {})}
    t0 = time.time()
    km, kc = start_new_kernel(kernel_name=kernel, startup_timeout=300, env=env)
    marks = {"client: start_new_kernel returned (kernel_info + 0.2 s IOPub drain)": time.time()}
    kc.execute_interactive("6*7", timeout=300, output_hook=lambda m: None)
    marks["client: first execute_result and reply"] = time.time()
    kc.stop_channels()
    km.shutdown_kernel(now=False)
    if timeline_file:
        with open(timeline_file) as fh:
            marks.update(json.load(fh)["marks"])
        os.unlink(timeline_file)
    return {name: (at - t0) * 1000 for name, at in marks.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=7)
    ap.add_argument("--kernel", default="smolvm-python")
    args = ap.parse_args()
    launch(args.kernel, None)     # the snapshot exists and the page cache is warm
    local, smol = [], []
    for _ in range(args.launches):
        local.append(launch("python3", None))
        fd, path = tempfile.mkstemp(prefix="smolvm-timeline-", suffix=".json")
        os.close(fd)
        smol.append(launch(args.kernel, path))

    def table(runs: list[dict[str, float]]) -> list[tuple[str, float, float, float]]:
        names = sorted({n for r in runs for n in r}, key=lambda n: statistics.median(r[n] for r in runs if n in r))
        return [(n, statistics.median(v), min(v), max(v))
                for n in names for v in [[r[n] for r in runs if n in r]]]

    print(f"\nmedian of {args.launches} alternating launches; ms after the client launched the kernel\n")
    print(f"| milestone | {args.kernel} | local python3 |\n|---|---|---|")
    local_rows = {n: (m, lo, hi) for n, m, lo, hi in table(local)}
    for name, med, lo, hi in table(smol):
        other = local_rows.get(name)
        print(f"| {name} | {med:.0f} ({lo:.0f}-{hi:.0f}) | "
              + (f"{other[0]:.0f} ({other[1]:.0f}-{other[2]:.0f})" if other else "-") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
