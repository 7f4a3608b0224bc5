"""The demo: boot a microVM and print results computed inside it."""

from __future__ import annotations

import sys
import time

from smolvm_kernel.sandbox import Sandbox

CELLS = [
    ("guest kernel", "import os; os.uname().release"),
    ("guest MemTotal", "[l for l in open('/proc/meminfo') if l.startswith('MemTotal')][0].strip()"),
    ("define state", "counter = sum(range(10))\ncounter"),
    ("state persists", "counter * 2"),
    ("network interfaces", "sorted(os.listdir('/sys/class/net'))"),
]


def main() -> int:
    t0 = time.monotonic()
    with Sandbox(vcpus=2, mem_mib=512, progress=lambda m: print(f"[smolvm] {m}", flush=True)) as sb:
        print(f"[smolvm] {sb.stats()['backend']}/{sb.stats()['accel']}: {sb.accel_reason}")
        for label, code in CELLS:
            outputs = list(sb.execute(code, timeout=60))
            text = " ".join(o.text.strip() for o in outputs)
            print(f"{label:>20}: {text}")
            if any(o.type == "error" for o in outputs):
                return 1
    print(f"[smolvm] done in {time.monotonic() - t0:.1f} s; the VM and its files are gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
