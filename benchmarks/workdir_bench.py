"""What the notebook's folder costs: launch -> first result and a `pass` round trip.

    python benchmarks/workdir_bench.py [--launches 5] [--rounds 100]

A kernel starts in its notebook's folder, which SmolVM copies into the VM
(vm/workdir.py) and watches after each cell (read-write). Columns: a local
ipykernel, then SmolVM Python with the folder off (SMOLVM_WORKDIR_MODE=off,
the cost-free baseline), with an empty folder, and with a course-sized folder
(3 notebooks, a helper module, 6 CSV files: 2.1 MB in 10 files). Launches
alternate the configurations round by round so all meet the same machine;
each launch's first cell reads a file of the folder (`os.listdir()`), so the
figure is what a user waits for. Median and range; the last column is the
course folder against the folder off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import median  # noqa: E402
from kernel_bench import _round_trips  # noqa: E402


def make_course(root: Path) -> int:
    """A course folder of about the size the issue names (a few MB, a dozen files)."""
    rng = random.Random(7)
    (root / "data").mkdir(parents=True)
    for i in range(6):
        rows = "\n".join(f"{rng.random():.6f},{rng.random():.6f},{rng.randint(0, 999)}" for _ in range(15000))
        (root / "data" / f"table{i}.csv").write_text("a,b,c\n" + rows + "\n")
    cells = [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
              "source": f"x{i} = {i}\n" * 20} for i in range(40)]
    for name in ("01-intro.ipynb", "02-pandas.ipynb", "03-plots.ipynb"):
        (root / name).write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    (root / "helpers.py").write_text("def mean(xs):\n    return sum(xs) / len(xs)\n" * 20)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def launch_once(kernel: str, folder: Path, env: dict) -> float:
    t0 = time.monotonic()
    km, kc = start_new_kernel(kernel_name=kernel, startup_timeout=300, cwd=str(folder), env=env)
    try:
        reply = kc.execute_interactive("import os; len(os.listdir())", timeout=300, output_hook=lambda m: None)
        took = time.monotonic() - t0
        assert reply["content"]["status"] == "ok", reply["content"]
        return took
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def round_trips(kernel: str, folder: Path, env: dict, rounds: int) -> float:
    km, kc = start_new_kernel(kernel_name=kernel, startup_timeout=300, cwd=str(folder), env=env)
    try:
        return median(_round_trips(kc, rounds))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="smolvm-workdir-bench-"))
    try:
        empty, course = tmp / "empty", tmp / "course"
        empty.mkdir()
        size = make_course(course)
        files = sum(1 for p in course.rglob("*") if p.is_file())
        base_env = {k: v for k, v in os.environ.items() if k not in ("SMOLVM_WORKDIR", "SMOLVM_WORKDIR_MODE")}
        configs = {
            "local ipykernel": ("python3", course, base_env),
            "SmolVM, folder off": ("smolvm-python", course, {**base_env, "SMOLVM_WORKDIR_MODE": "off"}),
            "SmolVM, empty folder": ("smolvm-python", empty, base_env),
            "SmolVM, course folder": ("smolvm-python", course, base_env),
        }
        from smolvm_kernel.vm.sandbox import Sandbox

        ready = Sandbox(snapshot="wait")     # the ready snapshot every launch restores (built once)
        ready.start()
        ready.stop()
        for kernel, folder, env in configs.values():   # one unmeasured start each (caches)
            launch_once(kernel, folder, env)
        launches: dict[str, list[float]] = {name: [] for name in configs}
        for i in range(args.launches):
            order = list(configs) if i % 2 == 0 else list(configs)[::-1]
            for name in order:
                launches[name].append(launch_once(*configs[name]))
        rts = {name: round_trips(*configs[name], args.rounds) for name in configs}
        for p in course.glob("*.part"):
            p.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    names = list(configs)
    print(f"course folder: {files} files, {size / 1e6:.1f} MB; {args.launches} launches each, "
          f"`pass` p50 of {args.rounds} rounds\n")
    print("| | " + " | ".join(names) + " | course vs off |")
    print("|---|" + "---|" * (len(names) + 1))
    off, crs = median(launches["SmolVM, folder off"]), median(launches["SmolVM, course folder"])
    cells = [f"{median(v):.3f} s ({min(v):.2f}-{max(v):.2f})" for v in launches.values()]
    print(f"| launch -> first result | {' | '.join(cells)} | {100 * (crs / off - 1):+.0f}% |")
    off_rt, crs_rt = rts["SmolVM, folder off"], rts["SmolVM, course folder"]
    print(f"| `pass` round trip p50 | {' | '.join(f'{v * 1000:.1f} ms' for v in rts.values())} | "
          f"{100 * (crs_rt / off_rt - 1):+.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
