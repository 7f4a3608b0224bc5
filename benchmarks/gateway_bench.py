"""Start -> first result through a gateway placing SmolVM kernels on two hosts,
against the same kernel started directly on this host.

    sudo .venv/bin/python benchmarks/gateway_bench.py --kernels 6

The two hosts are network namespaces on this machine with their own sshd
(the set-up of tests/vm/test_gateway_hosts.py); a Jupyter Server with
gateway_provisioners and SmolVM's placement reaches them over veth pairs.
Prints, for each way: kernel start (REST) -> first execute_result, p50 and
max, for N kernels started one after another and for N started at once, and
where the kernels were placed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "vm")]


def first_result_direct(n: int) -> list[float]:
    """smolvm-python started by jupyter_client on this host, one after another."""
    from jupyter_client.manager import start_new_kernel

    out = []
    for _ in range(n):
        t0 = time.monotonic()
        km, kc = start_new_kernel(kernel_name="smolvm-python", startup_timeout=120)
        try:
            kc.execute_interactive("1 + 1", timeout=120, output_hook=lambda m: None)
            out.append(time.monotonic() - t0)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
    return out


async def first_result_gateway(user, n: int, at_once: bool) -> tuple[list[float], list[str]]:
    async def one() -> tuple[float, str]:
        t0 = time.monotonic()
        kid = await asyncio.to_thread(user.start_kernel, "smolvm-hosts")
        ks = user.open_kernel(kid)
        await ks.connect()
        r = await ks.execute("1 + 1", timeout=300)
        took = time.monotonic() - t0
        ks.close()
        assert r.status == "ok" and r.text.endswith("2"), r.text
        return took, kid
    if at_once:
        results = await asyncio.gather(*(one() for _ in range(n)))
    else:
        results = [await one() for _ in range(n)]
    return [t for t, _ in results], [k for _, k in results]


def main() -> int:
    from test_gateway_hosts import two_hosts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", type=int, default=6)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: it makes network namespaces and runs sshd", file=sys.stderr)
        return 2
    direct = first_result_direct(args.kernels)
    folder = Path(tempfile.mkdtemp(prefix="smolvm-gwbench-"))
    with two_hosts(folder, host2_max_vms=None) as (user, hosts):
        seq, kids = asyncio.run(first_result_gateway(user, args.kernels, at_once=False))
        placed_seq = {h.n: len(h.vmms()) for h in hosts}
        for kid in kids:
            user.server("DELETE", f"/api/kernels/{kid}")
        time.sleep(3)
        par, kids = asyncio.run(first_result_gateway(user, args.kernels, at_once=True))
        placed_par = {h.n: len(h.vmms()) for h in hosts}
        for kid in kids:
            user.server("DELETE", f"/api/kernels/{kid}")
        time.sleep(3)

    def fmt(xs):
        return f"{statistics.median(xs):.2f} / {max(xs):.2f} s"
    print(f"\ngateway_bench: {args.kernels} kernels, 2 hosts (network namespaces with sshd), {platform.node()}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| start -> first result, p50 / max | direct (jupyter_client, this host) | through the gateway |")
    print("|---|---|---|")
    print(f"| {args.kernels} kernels one after another | {fmt(direct)} | {fmt(seq)} "
          f"(host 1: {placed_seq[1]}, host 2: {placed_seq[2]}) |")
    print(f"| {args.kernels} kernels at once | - | {fmt(par)} (host 1: {placed_par[1]}, host 2: {placed_par[2]}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
