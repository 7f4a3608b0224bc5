"""Reproduce the open agent crash: a VM that went through a fork bomb (and
disks filled, vCPUs spun) and then idles; watch whether its agent dies.

    SMOLVM_STATE_DIR=/tmp/probe python scripts/bomb_aftermath_probe.py [--minutes 15]

Seen: the agent died with SIGSEGV 9-13 minutes after the bomb while other VM
tests loaded the host (run them at the same time); not on an idle host.
Prints when the VM died and its console tail, or that it is still alive.
"""

from __future__ import annotations

import argparse
import time

from smolvm_kernel.vm.sandbox import Sandbox, SandboxState

WORKLOAD = [
    "import os\nwhile True:\n    os.fork()",
    *(f"import os\ntry:\n    f = open({p!r}, 'wb')\n    while True:\n        f.write(b'x' * 2**20)\n"
      f"except OSError:\n    pass\nfinally:\n    os.unlink({p!r})"
      for p in ("/home/user/fill", "/tmp/fill", "/dev/shm/fill")),
    "import multiprocessing as mp, time\nps = [mp.Process(target=lambda: [0 for _ in iter(int, 1)]) "
    "for _ in range(16)]\n[p.start() for p in ps]\ntime.sleep(14)\n[p.kill() for p in ps]",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15)
    args = ap.parse_args()
    sb = Sandbox(vcpus=2, mem_mib=512, backend="qemu")
    sb.start()
    t0 = time.monotonic()
    try:
        for code in WORKLOAD:
            list(sb.execute(code, timeout=120))
        print(f"workload done at {time.monotonic() - t0:.0f} s", flush=True)
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(15)
            if sb.state == SandboxState.DEAD:
                print(f"DEAD at {time.monotonic() - t0:.0f} s: {sb._death}", flush=True)
                # faulthandler (guest/init.py) prints the agent's Python stacks here.
                print(sb.backend.console_tail(20000) if sb.backend else "(no console)", flush=True)
                return 1
        out = "".join(o.text for o in sb.execute("print('ok')") if o.type == "stream")
        print(f"alive after {time.monotonic() - t0:.0f} s: {out.strip()}")
        return 0
    finally:
        sb.stop()


if __name__ == "__main__":
    raise SystemExit(main())
