"""What checkpoints cost, and what they save, against a local ipykernel.

    python benchmarks/checkpoint_bench.py [--repeats 3] [--rounds 30] [--forks 10]

SmolVM Python (2 vCPU, 512 MiB) and a local ipykernel, in one run:

- a checkpoint's time and size, of a fresh VM and of one holding 200 MiB
  of incompressible arrays (``bytearray`` filled from ``os.urandom``: what
  random numpy arrays weigh, without the scipy image). 300 MiB does not fit
  a 512 MiB VM: the guest kernel's cgroup allows it 361 MiB, ~90 of which
  the kernel itself uses;
- getting a state back: ``%smolvm restore`` -> first result, against what a
  local kernel must do instead (restart, re-run the cell that made the state);
- ``%smolvm undo`` end to end (the line, then the next cell's result);
- the per-cell cost of undo steps (``%smolvm config --undo N``): a ``pass``
  cell, and a cell that writes 8 MiB, with steps on and off (median of
  ``--rounds``), against the local kernel;
- ``Sandbox.fork(checkpoint, n)`` -> all n ready, and the host memory (PSS of
  the VMMs) of n forks of that state against n fresh VMs that each
  make it, and n local kernels that each make it.

Median of ``--repeats`` for the single timings; the machine is named by
run_all.py (or here, with --header).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import median  # noqa: E402
from snapshot_bench import pss_kib  # noqa: E402

STATE_MIB = 200
MAKE_STATE = (f"import os\nblob = bytearray({STATE_MIB} * 2**20)\n"
              f"for i in range(0, len(blob), 2**24):\n    blob[i:i + 2**24] = os.urandom(2**24)\nlen(blob)")
WRITE_8MIB = "buf = bytearray(os.urandom(8 * 2**20))"


def timed(kc, code: str, timeout: float = 600) -> tuple[float, str]:
    outs: list[str] = []
    t = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda m: outs.append(
        m["content"].get("text", "") if m["msg_type"] == "stream" else ""))
    took = time.perf_counter() - t
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {reply['content'].get('evalue')}")
    return took, "".join(outs)


def kernel(name: str, folder: str, env: dict | None = None):
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=300, cwd=folder, env=env or dict(os.environ))
    timed(kc, "import os")
    return km, kc


def stop(km, kc) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def per_cell(kc, code: str, rounds: int, think: float = 0.0) -> float:
    """Median time of ``code`` run ``rounds`` times, ``think`` seconds apart
    (a user reading and typing; 0: back to back, as Run All)."""
    for _ in range(3):
        timed(kc, code)
    times = []
    for _ in range(rounds):
        time.sleep(think)
        times.append(timed(kc, code)[0])
    return median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--forks", type=int, default=10)
    ap.add_argument("--header", action="store_true", help="name the machine first (run_all.py does)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="smolvm-checkpoint-bench-")
    env = {**os.environ, "SMOLVM_WORKDIR_MODE": "off", "SMOLVM_STATE_DIR": tempfile.mkdtemp(prefix="smolvm-ck-")}
    os.environ["SMOLVM_STATE_DIR"] = env["SMOLVM_STATE_DIR"]
    from smolvm_kernel.vm.checkpoints import CheckpointStore
    store = CheckpointStore()
    rows: list[tuple[str, str, str]] = []

    # -- the local kernel: its way back to a state is a restart and a re-run
    km, kc = kernel("python3", folder)
    local_pass = per_cell(kc, "pass", args.rounds)
    local_write = per_cell(kc, WRITE_8MIB, args.rounds)
    back = []
    for _ in range(args.repeats):
        timed(kc, MAKE_STATE)
        t = time.perf_counter()
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        timed(kc, MAKE_STATE)
        back.append(time.perf_counter() - t)
    local_back = median(back)
    stop(km, kc)

    # -- SmolVM: checkpoints of a fresh VM and of one holding the state
    km, kc = kernel("smolvm-python", folder, env)
    fresh_s, fresh_size = [], []
    for i in range(args.repeats):
        took, _ = timed(kc, f"%smolvm checkpoint fresh{i}")
        fresh_s.append(took)
        fresh_size.append(store.open(f"fresh{i}").size / 2**20)
    timed(kc, MAKE_STATE)
    big_s, big_size = [], []
    for i in range(args.repeats):
        took, _ = timed(kc, f"%smolvm checkpoint big{i}")
        big_s.append(took)
        big_size.append(store.open(f"big{i}").size / 2**20)
    restore = []
    for i in range(args.repeats):
        timed(kc, "del blob")
        t = time.perf_counter()
        timed(kc, "%smolvm restore big0")
        timed(kc, "len(blob)")
        restore.append(time.perf_counter() - t)
    # Undo steps: in the VM holding the state, and with it freed (a fresh VM's size).
    smol_pass = per_cell(kc, "pass", args.rounds)
    smol_write = per_cell(kc, WRITE_8MIB, args.rounds)
    timed(kc, "%smolvm config --undo 3")
    held = {think: (per_cell(kc, "pass", args.rounds, think), per_cell(kc, WRITE_8MIB, args.rounds, think))
            for think in (0.0, 1.0)}
    timed(kc, "del blob")
    freed = {think: (per_cell(kc, "pass", args.rounds, think), per_cell(kc, WRITE_8MIB, args.rounds, think))
             for think in (0.0, 1.0)}
    timed(kc, MAKE_STATE)
    undo = []
    for _ in range(args.repeats):
        timed(kc, "x = 1")
        timed(kc, "x = 2")
        t = time.perf_counter()
        timed(kc, "%smolvm undo")
        _, text = timed(kc, "print(x)")
        undo.append(time.perf_counter() - t)
        assert text.strip() == "1", text
    timed(kc, "%smolvm config --undo 0")
    stop(km, kc)

    rows += [
        ("checkpoint of a fresh VM (time, size)", "-",
         f"{median(fresh_s):.2f} s, {median(fresh_size):.0f} MiB"),
        (f"checkpoint holding {STATE_MIB} MiB of arrays (time, size)", "-",
         f"{median(big_s):.2f} s, {median(big_size):.0f} MiB"),
        (f"back to the {STATE_MIB} MiB state -> first result", f"{local_back:.2f} s (restart + re-run)",
         f"{median(restore):.2f} s (%smolvm restore)"),
        ("%smolvm undo -> next result", "- (no undo)", f"{median(undo):.2f} s"),
        ("`pass` cell / a cell writing 8 MiB, undo steps off", f"{local_pass * 1000:.1f} / {local_write * 1000:.1f} ms",
         f"{smol_pass * 1000:.1f} / {smol_write * 1000:.1f} ms"),
    ]
    for label, figures in ((f"holding {STATE_MIB} MiB", held), ("fresh-sized", freed)):
        for think, (p, w) in figures.items():
            when = "back to back (Run All)" if think == 0 else f"{think:g} s apart (typing)"
            rows.append((f"same, undo steps on, {label} VM, {when}", "-",
                         f"{p * 1000:.0f} (+{(p - smol_pass) * 1000:.0f}) / {w * 1000:.0f} "
                         f"(+{(w - smol_write) * 1000:.0f}) ms"))

    # -- fork(n) of the state against n that each make it
    from smolvm_kernel.vm.sandbox import Sandbox

    n = args.forks
    src = Sandbox(workdir_mode="off")
    src.start()
    list(src.execute(MAKE_STATE))
    ck = src.checkpoint("forkme")
    src.stop()
    t = time.perf_counter()
    forks = src.fork(ck, n)
    fork_s = time.perf_counter() - t
    for f in forks:
        list(f.execute("len(blob)"))
    fork_pss = sum(pss_kib(f.backend.pid) for f in forks) / 1024
    for f in forks:
        f.stop()
    t = time.perf_counter()
    fresh = [Sandbox(workdir_mode="off") for _ in range(n)]
    for f in fresh:
        f.start()
        list(f.execute(MAKE_STATE))
    fresh_s_all = time.perf_counter() - t
    fresh_pss = sum(pss_kib(f.backend.pid) for f in fresh) / 1024
    for f in fresh:
        f.stop()
    src.remove_checkpoint("forkme")
    locals_ = []
    t = time.perf_counter()
    for _ in range(n):
        k = kernel("python3", folder)
        timed(k[1], MAKE_STATE)
        locals_.append(k)
    local_all = time.perf_counter() - t
    local_pss = sum(pss_kib(k[0].provisioner.process.pid) for k in locals_) / 1024
    for k in locals_:
        stop(*k)
    rows += [
        (f"{n} copies of the {STATE_MIB} MiB state -> all ready", f"{local_all:.1f} s ({n} kernels re-run it)",
         f"{fork_s:.1f} s fork({n}) / {fresh_s_all:.1f} s {n} fresh VMs re-run it"),
        (f"host memory of those {n} (PSS)", f"{local_pss:.0f} MiB",
         f"{fork_pss:.0f} MiB forks / {fresh_pss:.0f} MiB fresh VMs"),
    ]

    if args.header:
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores")
    width = max(len(r[0]) for r in rows)
    print(f"| {'':<{width}} | local ipykernel | SmolVM Python (TCG, 2 vCPU / 512 MiB) |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for what, local, smol in rows:
        print(f"| {what:<{width}} | {local} | {smol} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
