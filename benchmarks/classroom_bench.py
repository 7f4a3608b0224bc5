"""A class at once: N students log in to the hub, start their servers, and all
run the same short course notebook in SmolVM Python at the same time.

    sudo .venv/bin/python benchmarks/classroom_bench.py --students 40

On loopback only; it creates N Unix accounts and removes them at the end,
and stops by itself. Prints: students served, p50/p95/max time to the first
result and to the end of the notebook, host memory (peak, and per idle
student running and paused), resume time, refusals by the budget with their
message, OOM kills, the hub's API latency during the run, and the same
notebook under a local ipykernel for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smolvm_kernel.classroom import deploy as cr  # noqa: E402
from smolvm_kernel.classroom.provision import read_students  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))
from hubclient import HubStudent  # noqa: E402  (a student over REST and websocket: test support)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import percentile  # noqa: E402

COURSE = [
    "import math, random, statistics\nrandom.seed(1)\nprint('hello from the course notebook')",
    "data = [random.gauss(0, 1) for _ in range(20000)]\nround(statistics.mean(data), 3), round(statistics.stdev(data), 3)",
    "def primes(n):\n    sieve = bytearray([1]) * (n + 1)\n    sieve[0:2] = b'\\0\\0'\n"
    "    for i in range(2, int(n ** 0.5) + 1):\n        if sieve[i]:\n"
    "            sieve[i * i::i] = bytes(len(range(i * i, n + 1, i)))\n"
    "    return [i for i, v in enumerate(sieve) if v]\nlen(primes(200000))",
    "words = 'the quick brown fox jumps over the lazy dog'.split()\n"
    "{w: len(w) for w in sorted(set(words))}",
    "from IPython.display import Markdown\nMarkdown(f'**done**: {len(data)} samples')",
]

POLICY = """
max_vcpus = 1
max_mem_mib = 512
max_exec_timeout = 600
network = ["none"]
profiles = ["base"]
pause_after = {pause_after}
max_vms_per_user = 1
host_reserve_mib = {reserve}
{host_max_vms}
hostd = "{dir}/hostd.sock"
audit_log = "{dir}/audit.jsonl"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_used_mib() -> float:
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            k, v = line.split(":")
            info[k] = int(v.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def oom_kills() -> int:
    with open("/proc/vmstat") as fh:
        for line in fh:
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


def pss_by_kind(uids: set[int]) -> dict[str, list[float]]:
    """Proportional set size (MiB) of each of the students' processes, by kind."""
    out: dict[str, list[float]] = {"VMM (QEMU)": [], "SmolVM kernel": [], "JupyterLab server": [], "other": []}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
            uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
            if uid not in uids:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            pss = next(int(line.split()[1]) for line in (d / "smaps_rollup").read_text().splitlines()
                       if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
        kind = ("VMM (QEMU)" if "qemu-system" in cmd else "SmolVM kernel" if "launch.py" in cmd
                else "JupyterLab server" if "jupyterhub-singleuser" in cmd else "other")
        out[kind].append(pss / 1024)
    return out


pct = percentile


class Sampler(threading.Thread):
    """Host memory in use, and the hub's API latency, every half second."""

    def __init__(self, probe: HubStudent) -> None:
        super().__init__(daemon=True)
        self.probe, self.peak, self.hub_ms, self.stop_flag = probe, 0.0, [], False

    def run(self) -> None:
        while not self.stop_flag:
            self.peak = max(self.peak, mem_used_mib())
            t = time.monotonic()
            try:
                self.probe.api("GET", "/hub/api/user")
                self.hub_ms.append((time.monotonic() - t) * 1000)
            except Exception:
                self.hub_ms.append(float("inf"))
            time.sleep(0.5)


async def run_course(student: HubStudent, results: dict) -> None:
    t0 = time.monotonic()
    try:
        kid = await asyncio.to_thread(student.start_kernel)
        ks = student.open_kernel(kid)
        await ks.connect()
        first = None
        for i, code in enumerate(COURSE):
            r = await ks.execute(code, timeout=900)
            if first is None:
                first = time.monotonic() - t0 if r.first_output_s is not None else None
            if r.status != "ok":
                results[student.name] = {"error": r.text.strip().splitlines()[-1] if r.text.strip() else r.status,
                                         "cell": i, "kernel": kid}
                ks.close()
                return
        results[student.name] = {"first": first, "end": time.monotonic() - t0, "kernel": kid}
        ks.close()
    except Exception as exc:
        results[student.name] = {"error": f"{type(exc).__name__}: {exc}", "cell": None}


async def resume_some(students: list[HubStudent], results: dict) -> list[tuple[float, float]]:
    """(what the client waited for the cell's reply, what the kernel says its
    resume took) for each paused VM's next cell."""
    async def one(s):
        ks = s.open_kernel(results[s.name]["kernel"])
        await ks.connect()
        t = time.monotonic()
        r = await ks.execute("len(data)", timeout=300)
        waited = time.monotonic() - t
        ks.close()
        return r, waited
    times = []
    for got in await asyncio.gather(*(one(s) for s in students), return_exceptions=True):
        if isinstance(got, BaseException):
            continue
        r, waited = got
        if r.status == "ok" and "resumed in" in r.text:
            times.append((waited, float(r.text.split("resumed in ")[1].split(" s")[0])))
    return times


def local_reference() -> tuple[float, float]:
    """The notebook under a local ipykernel: launch -> first result, and end."""
    from jupyter_client.manager import start_new_kernel

    t0 = time.monotonic()
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    first = None
    try:
        for code in COURSE:
            kc.execute_interactive(code, timeout=120, output_hook=lambda m: None)
            first = first or time.monotonic() - t0
        return first, time.monotonic() - t0
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", type=int, default=40)
    ap.add_argument("--pause-after", type=int, default=45, help="the policy's idle pause, in seconds")
    ap.add_argument("--reserve-mib", type=int, default=3072, help="host memory the budget never gives to VMs")
    ap.add_argument("--concurrency", type=int, default=8, help="logins and server starts at once")
    ap.add_argument("--host-max-vms", type=int, default=None,
                    help="the host budget's VM count (default: none; the memory reserve still holds)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: it creates the students' Unix accounts", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="smolvm-classbench-", dir="/tmp"))
    os.chmod(folder, 0o755)
    prefix = f"cb{secrets.token_hex(2)}s"
    port = _free_port()
    hub = None
    base_mem, oom0 = mem_used_mib(), oom_kills()
    try:
        t = time.monotonic()
        cr.setup(folder, args.students, port=port, prefix=prefix, cull_idle_timeout=3600,
                 policy_text=POLICY.format(dir=folder, pause_after=args.pause_after, reserve=args.reserve_mib,
                                           host_max_vms=f"host_max_vms = {args.host_max_vms}"
                                           if args.host_max_vms else ""))
        setup_s = time.monotonic() - t
        accounts = read_students(folder)
        uids = {int(subprocess.check_output(["id", "-u", n]).strip()) for n, _ in accounts}
        hub = subprocess.Popen(cr.hub_command(folder), cwd=folder, stdout=open(folder / "hub.log", "wb"),
                               stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        students = [HubStudent(base, n, p, timeout=600) for n, p in accounts]
        deadline = time.monotonic() + 90
        while True:     # the proxy answers 404 until the hub has added its route
            try:
                if students[0].request("GET", "/hub/api/")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or hub.poll() is not None:
                raise SystemExit(f"the hub did not come up: {(folder / 'hub.log').read_text()[-2000:]}")
            time.sleep(0.5)
        t = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda s: (s.login(), s.start_server()), students))
        servers_s = time.monotonic() - t
        servers_mem = mem_used_mib()
        probe = HubStudent(base, accounts[0][0], accounts[0][1])
        probe.login()
        sampler = Sampler(probe)
        sampler.start()
        results: dict = {}
        t = time.monotonic()

        async def everyone():
            await asyncio.gather(*(run_course(s, results) for s in students))
        asyncio.run(everyone())
        class_s = time.monotonic() - t
        time.sleep(5)
        served = [s for s in students if "end" in results.get(s.name, {})]
        running_mem, running_pss = mem_used_mib(), pss_by_kind(uids)
        # Idle: wait for the pauses, then measure again.
        time.sleep(args.pause_after + 20)
        paused_mem, paused_pss = mem_used_mib(), pss_by_kind(uids)
        resumes = asyncio.run(resume_some(served[:5], results))
        sampler.stop_flag = True
        sampler.join(5)
        audit = (folder / "audit.jsonl").read_text().splitlines()
        pauses = sum('"event": "pause"' in line for line in audit)
        local_first, local_end = local_reference()
    finally:
        cr.teardown(folder, hub)

    failed = [r for r in results.values() if "error" in r]
    # Only the admission service's answer is a refusal by the budget; anything else failed.
    refused = [r for r in failed if "refused to start a microVM" in r["error"]]
    other = [r for r in failed if r not in refused]
    firsts = [results[s.name]["first"] for s in served]
    ends = [results[s.name]["end"] for s in served]
    n = len(served)
    hub_ms = [x for x in sampler.hub_ms if x != float("inf")]
    budget = f"; host budget {args.host_max_vms} VMs" if args.host_max_vms else ""
    print(f"\nclassroom_bench: {args.students} students{budget}, reserve {args.reserve_mib} MiB, {platform.node()}, {os.cpu_count()} cores, "
          f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"set-up {setup_s:.0f} s; {args.students} logins + servers {servers_s:.0f} s "
          f"(host memory in use {servers_mem - base_mem:+.0f} MiB); whole class's notebook {class_s:.0f} s\n")
    print("| figure | SmolVM Python (all students at once) | local ipykernel (one, alone) |")
    print("|---|---|---|")
    print(f"| students served / refused by the budget / failed otherwise | {n} / {len(refused)} / {len(other)} | - |")
    if n:
        print(f"| kernel start -> first result, p50 / p95 / max | {statistics.median(firsts):.1f} / "
              f"{pct(firsts, 95):.1f} / {max(firsts):.1f} s | {local_first:.2f} s |")
        print(f"| kernel start -> end of notebook, p50 / p95 / max | {statistics.median(ends):.1f} / "
              f"{pct(ends, 95):.1f} / {max(ends):.1f} s | {local_end:.2f} s |")
    print(f"| host memory in use, peak (above the idle host) | {sampler.peak - base_mem:.0f} MiB | - |")
    students_n = len(students)
    print(f"| per student's JupyterLab server, before any kernel (n={students_n}) | "
          f"{(servers_mem - base_mem) / students_n:.0f} MiB of host memory in use | - |")
    for label, mem, pss in (("running", running_mem, running_pss), ("paused", paused_mem, paused_pss)):
        parts = ", ".join(f"{len(v)} {k} {statistics.mean(v):.0f}" for k, v in pss.items() if v)
        per_vm = f"{(mem - servers_mem) / n:.0f} MiB" if n else "-"
        print(f"| per idle student's kernel and VM, VMs {label} (over the {n} served) | {per_vm} of host memory "
              f"in use above the servers (PSS each: {parts} MiB) | - |")
    print(f"| VMs paused to disk while idle | {pauses} | - |")
    if resumes:
        waited, said = [w for w, _ in resumes], [k for _, k in resumes]
        print(f"| paused VM: next cell's reply as the client waited for it (n={len(resumes)}) | "
              f"{statistics.median(waited):.2f} s p50, {max(waited):.2f} s max (the kernel's own resume figure: "
              f"{statistics.median(said):.2f} s p50) | - |")
    if hub_ms:
        print(f"| hub API during the run (GET /hub/api/user, n={len(hub_ms)}) | {statistics.median(hub_ms):.0f} ms "
              f"p50, {max(hub_ms):.0f} ms max; failures {len(sampler.hub_ms) - len(hub_ms)} | - |")
    print(f"| OOM kills on the host | {oom_kills() - oom0} | - |")
    if refused:
        print(f"\nrefused by the budget ({len(refused)}), e.g.: {refused[0]['error']}")
    if other:
        print(f"\nfailed otherwise ({len(other)}), e.g.: {other[0]['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
