"""Output floods, side by side: a local python3 kernel vs SmolVM Python, in one run.

    python benchmarks/flood_bench.py [--scale 1.0] [--only stdout,single,displays,line]

The floods (sizes times --scale): 1 GB of stdout in 64 KiB lines, one 200 MB
output, 100,000 display() calls, one 100 MB line without a newline. Each runs
on a fresh kernel of each kind. Printed per flood and kernel: seconds to the
cell's reply, what the client received (MiB, messages, the kernel's
[smolvm] notes), the kernel process's peak RSS (VmHWM: its own; the VMM is
bounded by its cgroup), the worst `pass` round trip of *another* (local)
kernel during the flood (the host stays responsive), and whether the next
cell works in that kernel.

The SmolVM kernel caps what one cell sends the notebook (max_output_mib, 16
by default) and says how much it dropped; the local kernel sends everything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from jupyter_client.manager import start_new_kernel

MIB = 2**20
FLOODS = {
    # name: (what, code with {n} scaled)
    "stdout": ("1 GB of stdout (64 KiB lines)", "import sys\nline = 'y' * 65535 + '\\n'\n"
                                                  "for _ in range({n}):\n    sys.stdout.write(line)\n", 16384),
    "single": ("one 200 MB output", "print('x' * {n})", 200_000_000),
    "displays": ("100,000 display() calls", "from IPython.display import display\n"
                                              "for i in range({n}):\n    display(i)\n", 100_000),
    "line": ("one 100 MB line, no newline", "import sys\nchunk = 'z' * 1_000_000\n"
                                              "for _ in range({n}):\n    sys.stdout.write(chunk)\n", 100),
}


def _vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Pinger(threading.Thread):
    """`pass` round trips on another local kernel, for as long as a flood runs."""

    def __init__(self, kc) -> None:
        super().__init__(daemon=True)
        self.kc, self.times, self.running = kc, [], True

    def run(self) -> None:
        while self.running:
            t = time.perf_counter()
            self.kc.execute_interactive("pass", timeout=120, output_hook=lambda m: None)
            self.times.append(time.perf_counter() - t)
            time.sleep(0.05)


def flood(kernel_name: str, name: str, scale: float, other_kc) -> dict:
    what, code, n = FLOODS[name]
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=180)
    try:
        kc.execute_interactive("pass", timeout=120, output_hook=lambda m: None)
        got = {"bytes": 0, "msgs": 0, "notes": []}

        def hook(msg):
            got["msgs"] += 1
            content = msg["content"]
            if msg["msg_type"] == "stream":
                text = content.get("text", "")
                if text.startswith("[smolvm]"):
                    got["notes"].append(text.strip())
                else:
                    got["bytes"] += len(text)
            elif msg["msg_type"] in ("display_data", "execute_result"):
                got["bytes"] += sum(len(str(v)) for v in content.get("data", {}).values())

        pinger = _Pinger(other_kc)
        pinger.start()
        t = time.perf_counter()
        reply = kc.execute_interactive(code.format(n=max(1, int(n * scale))), timeout=1800, output_hook=hook)
        took = time.perf_counter() - t
        pinger.running = False
        pinger.join()
        pid = km.provisioner.process.pid
        peak = _vm_hwm_mib(pid)
        after = []
        next_reply = kc.execute_interactive("print('next')", timeout=300,
                                            output_hook=lambda m: after.append(m))
        next_ok = next_reply["content"]["status"] == "ok" and any(
            m["msg_type"] == "stream" and "next" in m["content"].get("text", "") for m in after)
        content = reply["content"]
        return {"what": what, "took": took, "status": content["status"] + (
                    f" ({content.get('ename')}: {str(content.get('evalue'))[:90]})"
                    if content["status"] != "ok" else ""),
                "mib": got["bytes"] / MIB, "msgs": got["msgs"], "notes": got["notes"], "peak": peak,
                "ping_max": max(pinger.times) if pinger.times else float("nan"),
                "ping_p50": statistics.median(pinger.times) if pinger.times else float("nan"),
                "next_ok": next_ok}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every flood's size (default 1)")
    ap.add_argument("--only", default=",".join(FLOODS), help="comma-separated floods to run")
    ap.add_argument("--kernels", default="python3,smolvm-python")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in FLOODS:
            ap.error(f"--only: unknown flood {n!r}; choose from {', '.join(FLOODS)}")
    other_km, other_kc = start_new_kernel(kernel_name="python3")
    rows = []
    try:
        for name in names:
            for kernel in args.kernels.split(","):
                print(f"... {name} on {kernel}", file=sys.stderr, flush=True)
                rows.append((kernel, flood(kernel, name, args.scale, other_kc)))
    finally:
        other_kc.stop_channels()
        other_km.shutdown_kernel(now=True)
    print(f"\nOutput floods (scale {args.scale:g}); another local kernel's `pass` round trip during each\n")
    print("| flood | kernel | reply after | status | client got | messages | kernel peak RSS "
          "| other kernel's pass, p50 / max | next cell |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kernel, r in rows:
        print(f"| {r['what']} | {kernel} | {r['took']:.1f} s | {r['status']} | {r['mib']:.1f} MiB "
              f"| {r['msgs']} | {r['peak']:.0f} MiB | {r['ping_p50'] * 1000:.0f} / {r['ping_max'] * 1000:.0f} ms "
              f"| {'ok' if r['next_ok'] else 'FAILED'} |")
    notes = [(kernel, r["what"], note) for kernel, r in rows for note in r["notes"]]
    if notes:
        print("\nNotes the SmolVM kernel put in the cells:")
        for kernel, what, note in notes:
            print(f"- {what} ({kernel}): {note[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
