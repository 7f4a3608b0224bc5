"""Side by side: a local python3 kernel vs SmolVM Python over virtio-serial and over SSH.

    sudo python benchmarks/transport_bench.py [--rounds 200] [--mib 10]

The SSH column needs CAP_NET_ADMIN: the script makes a network namespace of
its own for the VM's TAP (no traffic leaves it) and removes it at the end.
vsock is measured where /dev/vhost-vsock exists (not on a host without it).
Rows: `pass` round trip p50/p99 through the kernel; N MiB of stdout.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time

from jupyter_client.manager import start_new_kernel
from _stats import median, percentile
from kernel_bench import _round_trips


def _stdout_code(mib: int) -> str:
    return (f"import sys\nline = 'x' * 1023 + '\\n'\n"
            f"for _ in range({mib} * 1024):\n    sys.stdout.write(line)\nsys.stdout.flush()\n")


def measure(kernel_name: str, rounds: int, mib: int) -> dict:
    t0 = time.monotonic()
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=300)
    try:
        kc.execute_interactive("pass", timeout=300, output_hook=lambda m: None)
        ready = time.monotonic() - t0
        times = _round_trips(kc, rounds)
        received = [0]

        def count(msg):
            if msg["msg_type"] == "stream":
                received[0] += len(msg["content"]["text"])
        t = time.perf_counter()
        kc.execute_interactive(_stdout_code(mib), timeout=900, output_hook=count)
        flood = time.perf_counter() - t
        times.sort()
        return {"ready": ready, "p50": median(times) * 1000,
                "p99": percentile(times, 99) * 1000, "flood": flood,
                "bytes": received[0]}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--mib", type=int, default=10)
    args = ap.parse_args()

    from pyroute2 import netns

    from smolvm_kernel.host.net import has_net_admin
    from smolvm_kernel.jupyter import kernelspec
    from smolvm_kernel.vm.boot import qemu_vsock_available

    prefix = tempfile.mkdtemp(prefix="smolvm-bench-")
    os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter") + os.pathsep + \
        os.environ.get("JUPYTER_PATH", "")
    columns = [("local python3", "python3")]
    kernelspec.install("bench-serial", prefix=prefix, backend="qemu", transport="serial")
    columns.append(("smolvm serial", "bench-serial"))
    if qemu_vsock_available():
        kernelspec.install("bench-vsock", prefix=prefix, backend="qemu", transport="vsock")
        columns.append(("smolvm vsock", "bench-vsock"))
    ns = None
    if has_net_admin():
        ns = f"smvb{secrets.token_hex(3)}"
        netns.create(ns)
        kernelspec.install("bench-ssh", prefix=prefix, backend="qemu", network="nat", transport="ssh",
                           netns=ns)
        columns.append(("smolvm ssh", "bench-ssh"))
    else:
        print("(no CAP_NET_ADMIN: the SSH column is left out)", file=sys.stderr)
    results = {}
    try:
        for label, name in columns:
            print(f"measuring {label} ...", file=sys.stderr, flush=True)
            results[label] = measure(name, args.rounds, args.mib)
    finally:
        if ns:
            netns.remove(ns)
    labels = list(results)
    print("\n| figure | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    rows = [("launch -> first reply", lambda r: f"{r['ready']:.2f} s"),
            ("`pass` round trip p50", lambda r: f"{r['p50']:.1f} ms"),
            ("`pass` round trip p99", lambda r: f"{r['p99']:.1f} ms"),
            (f"{args.mib} MiB of stdout", lambda r: f"{r['flood']:.2f} s"),
            ("... throughput", lambda r: f"{r['bytes'] / r['flood'] / 2**20:.1f} MiB/s")]
    for title, fmt in rows:
        print(f"| {title} | " + " | ".join(fmt(results[label]) for label in labels) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
