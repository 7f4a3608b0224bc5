"""Side by side: a local python3 kernel vs SmolVM Python, in one run.

    python benchmarks/kernel_bench.py [--rounds 200]

Rows: kernelspec launch -> client ready (start_new_kernel: the kernel_info
reply, then jupyter_client's 0.2 s of IOPub silence); launch -> first execute_result;
what a user meets first, on a fresh kernel: the second cell right after the
first, the first interrupt of a `while True: pass` 3 s in (interrupt ->
execute_reply), then a second interrupt. These rows are the median (and
range) of --first-use-runs fresh launches of each kernel, alternating which
kernel goes first in each round, so both meet the same machine;
`pass` round trip p50/p99; 200k lines of stdout; a 1 MB PNG display. The last
column compares the relay with talking to the guest kernel directly (the
Sandbox API over the same channel, no relay process): the relay's cost per
message. Numbers are wall-clock on this host; under TCG the guest is emulated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import median, percentile  # noqa: E402

STDOUT_CODE = "import sys\nfor i in range(200_000):\n    print(i)\n"
PNG_CODE = ("import base64, os\nfrom IPython.display import display\n"
            "display({'image/png': base64.b64encode(os.urandom(1_000_000)).decode()}, raw=True)\n")


def _round_trips(kc, rounds: int) -> list[float]:
    # A restored TCG guest translates its code afresh: warm both paths alike.
    for _ in range(20):
        kc.execute_interactive("pass", timeout=60)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        kc.execute_interactive("pass", timeout=60)
        times.append(time.perf_counter() - t)
    return times


def _timed(kc, code: str) -> float:
    t = time.perf_counter()
    kc.execute_interactive(code, timeout=600, output_hook=lambda m: None)
    return time.perf_counter() - t


def _first_error(kc) -> None:
    kc.execute_interactive("1/0", timeout=60, output_hook=lambda m: None)


def _interrupt_latency(km, kc, code: str) -> float:
    """Seconds from interrupt_request to the cell's idle."""
    import threading

    mark = {}

    def fire():
        time.sleep(1.0)
        mark["t"] = time.perf_counter()
        km.interrupt_kernel()

    threading.Thread(target=fire).start()
    kc.execute_interactive(code, timeout=60, output_hook=lambda m: None)
    return time.perf_counter() - mark["t"]


def _cell(kc, code: str, timeout: float = 120) -> float:
    t = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda m: None)
    assert reply["content"]["status"] in ("ok", "error"), reply
    return time.perf_counter() - t


def _interrupt_reply(km, kc, after: float = 3.0) -> float:
    """Seconds from the interrupt to the execute_reply of a `while True: pass` cell."""
    msg_id = kc.execute("while True: pass")
    time.sleep(after)
    t = time.perf_counter()
    km.interrupt_kernel()
    while True:
        reply = kc.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    took = time.perf_counter() - t
    while kc.get_iopub_msg(timeout=60)["content"].get("execution_state") != "idle":
        pass
    return took


_FIRST_USE = ("launch_info", "launch_result", "second_cell", "first_interrupt", "second_interrupt")


def _first_use_once(name: str) -> dict:
    """One fresh launch: the figures a user meets in their first minute."""
    t0 = time.monotonic()
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=300)
    out = {"launch_info": time.monotonic() - t0}
    try:
        kc.execute_interactive("6*7", timeout=300, output_hook=lambda m: None)
        out["launch_result"] = time.monotonic() - t0
        out["second_cell"] = _cell(kc, "print(21 * 2)")
        out["first_interrupt"] = _interrupt_reply(km, kc)
        out["second_interrupt"] = _interrupt_reply(km, kc)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return out


def bench_first_use(names: tuple[str, str], runs: int) -> dict[str, dict]:
    """Each kernel's first minute, median and range over ``runs`` fresh launches;
    the order alternates each round (first one kernel first, then the other)."""
    samples: dict[str, dict[str, list[float]]] = {n: {k: [] for k in _FIRST_USE} for n in names}
    for i in range(runs):
        for name in (names if i % 2 == 0 else names[::-1]):
            for key, value in _first_use_once(name).items():
                samples[name][key].append(value)
    return {name: {k: median(v) for k, v in rows.items()} | {f"{k}_range": (min(v), max(v)) for k, v in rows.items()}
            for name, rows in samples.items()}


def bench_kernel(name: str, rounds: int) -> dict:
    """The warm figures, on one kernel (its launch is not reported: bench_first_use's are)."""
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=120)
    kc.execute_interactive("6*7", timeout=300, output_hook=lambda m: None)    # the VM is up
    r: dict = {}
    try:
        rt = _round_trips(kc, rounds)
        r["rt_p50"], r["rt_p99"] = median(rt), percentile(rt, 99)
        r["stdout"] = _timed(kc, STDOUT_CODE)
        r["png"] = _timed(kc, PNG_CODE)
        _first_error(kc)   # the first traceback of a session is slow to format under TCG
        r["int_sleep"] = _interrupt_latency(km, kc, "import time; time.sleep(1e6)")
        r["int_loop"] = _interrupt_latency(km, kc, "while True: pass")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return r


def bench_direct(rounds: int) -> dict:
    """The same `pass` round trip through the Sandbox API (channel, no relay)."""
    from smolvm_kernel.vm.sandbox import Sandbox

    with Sandbox(backend="qemu") as sb:
        for _ in range(20):
            list(sb.execute("pass"))
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            list(sb.execute("pass"))
            times.append(time.perf_counter() - t)
    return {"rt_p50": median(times), "rt_p99": percentile(times, 99)}


def relay_cpu_per_message(n: int = 20000) -> float:
    """Seconds of relay work per guest->frontend message (verify, filter, re-sign), in-process."""
    from jupyter_client.session import Session

    from smolvm_guest.wire import Channel
    from smolvm_kernel.jupyter.relay import Relay

    class Guest:
        guest_key = b"g" * 64

    sent = []
    host = Session(key=b"h" * 64, check_pid=False)
    relay = Relay(host, Guest(), lambda sock, frames: sent.append(1))
    guest = Session(key=Guest.guest_key, check_pid=False)
    parent = host.msg("execute_request", content={"code": "pass"})["header"]
    frames = guest.serialize(guest.msg("stream", content={"name": "stdout", "text": "x" * 200},
                                       parent=parent), ident=[b"kernel.x.stream"])
    t = time.perf_counter()
    for _ in range(n):
        relay.on_guest(Channel.IOPUB, frames)
    assert len(sent) == n
    return (time.perf_counter() - t) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--kernel", default="smolvm-python")
    ap.add_argument("--first-use-runs", type=int, default=3,
                    help="fresh launches of each kernel, alternating, for the launch and first-use rows (median)")
    args = ap.parse_args()
    first = bench_first_use(("python3", args.kernel), args.first_use_runs)
    local = bench_kernel("python3", args.rounds) | first["python3"]
    smol = bench_kernel(args.kernel, args.rounds) | first[args.kernel]
    direct = bench_direct(args.rounds)
    n = args.first_use_runs
    rows = [
        (f"launch -> client ready (kernel_info + 0.2 s IOPub drain), median of {n}", "launch_info", "s"),
        (f"launch -> first execute_result, median of {n}", "launch_result", "s"),
        (f"fresh kernel: second cell right after the first, median of {n}", "second_cell", "ms"),
        ("fresh kernel: first interrupt -> execute_reply, `while True: pass` 3 s in", "first_interrupt", "ms"),
        ("fresh kernel: second interrupt -> execute_reply", "second_interrupt", "ms"),
        ("`pass` round trip p50", "rt_p50", "ms"),
        ("`pass` round trip p99", "rt_p99", "ms"),
        ("200k lines of stdout", "stdout", "s"),
        ("1 MB PNG display", "png", "s"),
        ("warm kernel: interrupt -> idle, time.sleep(1e6)", "int_sleep", "ms"),
        ("warm kernel: interrupt -> idle, while True: pass", "int_loop", "ms"),
    ]

    def fmt(v, unit, spread=None):
        if v is None:
            return "-"
        text = f"{v * 1000:.1f} ms" if unit == "ms" else f"{v:.2f} s"
        if spread and unit == "ms":
            text += f" ({spread[0] * 1000:.0f}-{spread[1] * 1000:.0f})"
        elif spread:
            text += f" ({spread[0]:.2f}-{spread[1]:.2f})"
        return text

    print(f"\n| figure | local python3 | {args.kernel} | guest direct (no relay) |")
    print("|---|---|---|---|")
    for label, key, unit in rows:
        print(f"| {label} | {fmt(local.get(key), unit, local.get(key + '_range'))} | "
              f"{fmt(smol.get(key), unit, smol.get(key + '_range'))} | "
              f"{fmt(direct.get(key), unit)} |")
    print(f"\nrelay work per message, in-process (verify + filter + re-sign): "
          f"{relay_cpu_per_message() * 1e6:.0f} µs")
    overhead = (smol["rt_p50"] - direct["rt_p50"]) * 1000
    print(f"\nrelay overhead per request (p50, relay - direct): {overhead:.2f} ms "
          f"(a `pass` request is 1 shell + 4 iopub/reply messages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
