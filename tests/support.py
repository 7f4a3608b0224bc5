"""Helpers the unit and VM tests share: polling for a condition, an asyncio
loop on a thread of its own (for a service the test talks to synchronously),
and removing the cgroup folder a hostd test made for its grants.

On ``sys.path`` through ``tests/conftest.py`` (pytest puts a rootless
conftest's folder there): ``from support import wait_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator


def wait_for(pred: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Whether ``pred()`` comes true within ``timeout`` seconds, asked every ``interval``."""
    end = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


@contextlib.contextmanager
def loop_thread() -> Iterator[Callable[[Coroutine], object]]:
    """An asyncio loop running on a thread of its own, for as long as the block;
    yields ``run(coro, timeout=5)``, which runs a coroutine there and returns its result."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Coroutine, timeout: float = 5) -> object:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    try:
        yield run
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def remove_cgroup_parent(name: str, wait: float = 5.0) -> None:
    """Remove the folder ``name`` that a test's hostd put its grants' cgroups
    in (``HostService(cgroup_parent=name)``), in every hierarchy, and what is
    left in it; a cgroup whose last process is still exiting gets ``wait``
    seconds to empty."""
    from smolvm_kernel.host import cgroups

    where = cgroups.probe(name)
    if not isinstance(where, str):
        for d in set(where.parents.values()):
            for child in [c for c in d.iterdir() if c.is_dir()]:
                wait_for(lambda: _rmdir(child), wait)
            _rmdir(d)
    cgroups.probe.cache_clear()


def _rmdir(d) -> bool:
    """Whether ``d`` is gone (removed now, or before)."""
    try:
        d.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


class FakeVM:
    """Sandbox-shaped, with no VM, for the kernel's and the magic's unit tests:
    starts, resets and stops at once (each recorded in ``calls``), keeps pushed
    files in ``files`` and its audit entries in a log of its own."""

    boot_seconds = 0.25

    def __init__(self, config) -> None:
        import tempfile
        from pathlib import Path

        from smolvm_kernel.host.audit import AuditLog
        from smolvm_kernel.vm.sandbox import SandboxState

        self.config = config
        self.States = SandboxState
        self.state = SandboxState.STOPPED
        self.backend = None
        self.calls: list[str] = []
        self.files: dict[str, bytes] = {}
        self.audit = AuditLog(Path(tempfile.mkdtemp()) / "audit.jsonl")
        self.audit_context: dict = {}

    def record_audit(self, event, **fields):
        self.audit.record(event, **fields)

    def start(self):
        self.calls.append("start")
        self.state = self.States.READY

    def reset(self):
        self.calls.append("reset")
        self.state = self.States.READY

    def stop(self):
        self.calls.append("stop")
        self.state = self.States.STOPPED

    def can_resize_live(self, mem_mib):
        return False

    def checkpoints(self):
        return []        # none: checkpoints are tested with real VMs (tests/vm/test_checkpoint_vm.py)

    def put_file(self, data, remote):
        self.files[remote] = data
        return len(data)
