"""Cold-boot N microVMs one after another and count how many reach the agent.

    python benchmarks/boot_loop.py --count 30 [--stage agent|kernel]

``agent``: QEMU launch until the guest agent answers the handshake (the
stage that used to hang ~1 boot in 15 under TCG, before the TSC fix).
``kernel``: until the in-guest ipykernel answers (the whole Sandbox start).
Prints each boot's time, then a summary; exit status 1 if any boot failed.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
import uuid

from smolvm_kernel.backends.accel import choose_accel, host_tsc_khz
from smolvm_kernel.backends.base import VMSpec
from smolvm_kernel.backends.qemu import QemuBackend, find_qemu
from smolvm_kernel.channel.stream import GuestChannel
from smolvm_kernel.host.registry import Registry
from smolvm_kernel.images import ImageCache
from smolvm_kernel.vm import aio
from smolvm_kernel.vm.sandbox import Sandbox


async def boot_to_agent(image, accel: str, timeout: float) -> tuple[float, str]:
    reg = Registry()
    vm_id = uuid.uuid4().hex[:12]
    spec = VMSpec(vm_id=vm_id, run_dir=reg.new_run_dir(vm_id), image=image, vcpus=2,
                  mem_mib=512, accel=accel, tsc_khz=host_tsc_khz() if accel == "tcg" else None)
    backend = QemuBackend(spec, find_qemu("qemu-system-x86_64"))
    t0 = time.monotonic()
    try:
        await backend.launch()
        reader, writer = await backend.open_channel(timeout)
        chan = GuestChannel(reader, writer, lambda c, b: None, lambda e: None)
        await chan.handshake({"key": secrets.token_hex(32)}, timeout - (time.monotonic() - t0))
        elapsed = time.monotonic() - t0
        await chan.close()
        return elapsed, ""
    except Exception as exc:
        return time.monotonic() - t0, f"{type(exc).__name__}: {exc}\n{backend.console_tail(1500)}"
    finally:
        await backend.kill()
        await backend.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--stage", choices=["agent", "kernel"], default="agent")
    ap.add_argument("--timeout", type=float, default=25.0)
    args = ap.parse_args()
    image = ImageCache().get("base")
    accel = choose_accel("auto", find_qemu("qemu-system-x86_64"), image)
    print(f"accelerator: {accel.name} ({accel.reason})")
    times, failures = [], []
    for i in range(1, args.count + 1):
        if args.stage == "agent":
            elapsed, error = aio.run(boot_to_agent(image, accel.name, args.timeout))
        else:
            t0 = time.monotonic()
            error = ""
            try:
                with Sandbox(backend="qemu", boot_timeout=max(args.timeout, 5)):
                    pass
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            elapsed = time.monotonic() - t0
        status = "ok" if not error else "FAILED"
        print(f"boot {i:3d}: {elapsed:6.2f} s  {status}", flush=True)
        if error:
            failures.append((i, error))
            print(error, flush=True)
        else:
            times.append(elapsed)
    ok = len(times)
    print(f"\n{ok}/{args.count} boots reached the {args.stage} "
          f"(timeout {args.timeout:.0f} s)")
    if times:
        print(f"time to {args.stage}: min {min(times):.2f} s, median {statistics.median(times):.2f} s, "
              f"max {max(times):.2f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
