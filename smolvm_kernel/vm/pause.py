"""Idle VMs paused to disk, and resumed on their next use, state intact.

A VM that has run no cell, sent no output and received nothing for
``SandboxConfig.pause_after`` seconds is saved to a file in its own run folder
with the QEMU migration the ready snapshots use (snapshot.py), and its VMM
ends: the host gets the VM's memory back, and keeps only the state file, the
VM's disk and the relaying kernel. The next message for the guest (a cell, a
widget event, a file transfer) loads it into a fresh VMM of the same shape,
reconnects the channel under the same key, and then goes through; the cell
gets a line saying how long the resume took.

What is not paused: a VM with a NIC or an SSH/vsock link (their TAP and link
belong to the VMM that ends), a Firecracker VM, and a VM whose owner says it
is busy (a running cell; see ``Sandbox.busy``). A VM paused mid-computation
in a background thread simply continues where it stopped.

A paused VM keeps its place in the host's budget (hostd.py): its student can
always come back to it, and the memory it gave back is the host's reserve.

All of this runs on the Sandbox's event loop; the Sandbox's messaging
methods hand frames here while the VM is paused (see :meth:`Pauser.hold`).
The Pauser works on the Machine (machine.py) and asks its owner for the
rest through the callables of :class:`PauseHooks`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from smolvm_guest.wire import Channel
from smolvm_kernel.errors import GuestDied, SmolVMError
from smolvm_kernel.host.procs import rss_kib as state_rss_kib
from smolvm_kernel.vm.lifecycle import SandboxState
from smolvm_kernel.vm.machine import Machine

log = logging.getLogger("smolvm_kernel.vm.pause")

#: The state file's name in the VM's run folder.
STATE_FILE = "paused.state"


@dataclasses.dataclass(frozen=True)
class PausedState:
    """What a resumed VMM loads (the backend's ``restore``): the saved state,
    and no disk to copy (the VM's own disk stays in its folder)."""

    state: Path
    #: A pause saves with x-ignore-shared on (snapshot._save; a fork's VMM had
    #: it on already), so the load must have it too. RAM that is not a shared
    #: file is in the stream either way.
    ignore_shared: bool = True
    scratch: None = None


def pause_due(now: float, last_active: float, pause_after: float, busy: bool) -> bool:
    """Whether a VM idle since ``last_active`` should be paused now."""
    return pause_after > 0 and not busy and now - last_active >= pause_after


def why_not_saveable(backend: str, transport: str, network: str, done: str) -> str | None:
    """Why a VM of this backend, transport and network cannot be saved to a
    file and loaded into a new VMM, or None when it can: the one rule for a
    pause, a checkpoint and a restore (``done`` says which, e.g. "paused to
    disk"). What belongs to its VMM would be lost."""
    if backend != "qemu":
        return f"only QEMU VMs are {done} (this one runs on {backend})"
    if transport != "serial":
        return (f"a VM reached over {transport} is not {done}: its link belongs to its VMM, "
                f"and a restored VM would come back without it")
    if network != "none":
        return (f"a VM with a network is not {done}: its TAP and its connections belong to its VMM, "
                f"and a restore would drop them")
    return None


def why_not_pausable(machine, network: str) -> str | None:
    """Why this VM cannot be paused to disk, or None when it can."""
    if machine is None or machine.backend is None:
        return "no microVM runs"
    return why_not_saveable(machine.backend.name, machine.transport, network, "paused to disk")


@dataclasses.dataclass
class PauseHooks:
    """What the Pauser asks of its owner (the Sandbox), as callables."""

    #: The running Machine, or None.
    machine: Callable[[], Machine | None]
    state: Callable[[], SandboxState]
    set_state: Callable[[SandboxState], None]
    #: Whether the owner has work in the VM (requests waiting, a running cell).
    busy: Callable[[], bool]
    #: The settings now: idle seconds before a pause (0 = never), the network, the boot timeout.
    pause_after: Callable[[], float]
    network: Callable[[], str]
    #: An audit event about this VM (the owner adds the VM's id and its context).
    record: Callable[..., None]
    #: A note for the cells waiting (the resume's line).
    notice: Callable[[str], None]


class Pauser:
    """Pause one VM to disk when idle; resume it when it is needed."""

    def __init__(self, hooks: PauseHooks) -> None:
        self.hooks = hooks
        #: The last time a message went to or came from the guest kernel.
        self.last_active = time.monotonic()
        #: Why pausing is off, if it is (for the status line).
        self.note = ""
        #: Frames sent while the VM is paused (or pausing), in order: they go
        #: to the guest once it is back.
        self._held: list[tuple[Channel, bytes]] = []
        self._pausing: asyncio.Task | None = None
        self._resuming: asyncio.Task | None = None
        self.paused_at: float | None = None      # time.monotonic()
        self.idle_s: float | None = None          # how long the VM was idle when paused
        self.state_bytes: int | None = None
        #: The last pause and resume, for the panel and benchmarks.
        self.last_pause_s: float | None = None
        self.last_resume_s: float | None = None
        self.pauses = 0

    def touch(self) -> None:
        """Something went to or came from the guest: the idle clock starts again."""
        self.last_active = time.monotonic()

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    @property
    def in_progress(self) -> bool:
        return self.paused or (self._pausing is not None and not self._pausing.done())

    def forget(self) -> None:
        """The VM is gone (stopped or dead): nothing is paused any more."""
        self._held.clear()
        self.paused_at = None
        for task in (self._pausing, self._resuming):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        self._pausing = self._resuming = None

    # -- messaging while paused (loop thread)

    def hold(self, chan: Channel, body: bytes) -> bool:
        """Keep a frame for the guest while the VM is paused; True if it was kept
        (and the resume has started)."""
        if not self.in_progress:
            return False
        self._held.append((chan, body))
        self.wake()
        return True

    def wake(self) -> asyncio.Task | None:
        """Start the resume (if paused or pausing); the task, or None if running."""
        if not self.in_progress:
            return None
        if self._resuming is None or self._resuming.done():
            self._resuming = asyncio.get_running_loop().create_task(self._resume_after_pause())
        return self._resuming

    # -- pause

    def maybe_pause(self) -> bool:
        """Called by the heartbeat every second while the VM runs; True when a
        pause has started (the heartbeat then ends: the resume starts a new one)."""
        h = self.hooks
        if not pause_due(time.monotonic(), self.last_active, h.pause_after(), h.busy()):
            return False
        machine = h.machine()
        why = why_not_pausable(machine, h.network())
        if why is not None:
            if self.note != why:
                self.note = why
                log.info("not pausing idle VM %s: %s", machine.vm_id if machine else "-", why)
            return False
        self._pausing = asyncio.get_running_loop().create_task(self.pause())
        return True

    async def pause(self) -> None:
        """Save the VM to its folder and end its VMM; on failure it goes on running."""
        from smolvm_kernel.vm.snapshot import _save

        h = self.hooks
        machine = h.machine()
        if machine is None or machine.channel is None or machine.backend is None \
                or h.state() != SandboxState.READY or self._held:
            return      # gone, busy, or already wanted again
        backend, vm_id = machine.backend, machine.vm_id
        t0 = time.monotonic()
        idle_s = t0 - self.last_active
        rss_kib = state_rss_kib(backend.pid)
        h.set_state(SandboxState.PAUSED)
        try:
            # Dropped caches and zeroed free pages keep the state file small.
            await machine.request("quiesce", timeout=30)
            state = backend.spec.run_dir / STATE_FILE
            size = await asyncio.to_thread(_save, backend.spec.run_dir / "qmp.sock", state)
        except (SmolVMError, OSError, asyncio.TimeoutError, TimeoutError, ValueError) as exc:
            log.warning("pausing VM %s failed, it goes on running: %s", vm_id, exc)
            self.note = f"the last pause failed: {exc}"
            await asyncio.to_thread(_cont, backend)
            if h.machine() is machine and h.state() == SandboxState.PAUSED:
                h.set_state(SandboxState.READY)
                self.touch()
            self._resume_held()
            return
        self.paused_at = time.monotonic()
        await machine.detach()
        self.idle_s, self.state_bytes = idle_s, size
        self.last_pause_s = time.monotonic() - t0
        self.pauses += 1
        h.record("pause", idle_s=round(idle_s, 1), state_bytes=size,
                 pause_s=round(self.last_pause_s, 3), vmm_rss_kib=rss_kib)
        log.info("paused idle VM %s to disk (%d MiB) in %.2f s", vm_id, size >> 20, self.last_pause_s)
        if self._held:
            self.wake()     # something came in while it was being saved

    def _resume_held(self) -> None:
        held, self._held = self._held, []
        machine = self.hooks.machine()
        for c, body in held:
            if machine is not None:
                machine.send(c, body)

    # -- resume

    async def _resume_after_pause(self) -> None:
        pausing = self._pausing
        if pausing is not None and not pausing.done():
            await asyncio.shield(pausing)
        if not self.paused:
            self._resume_held()      # the pause failed: the VM never stopped
            return
        try:
            await self.resume()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            error = exc if isinstance(exc, SmolVMError) else SmolVMError(f"{type(exc).__name__}: {exc}")
            self._held.clear()
            self.paused_at = None
            machine = self.hooks.machine()
            if machine is not None:
                machine.die(GuestDied(f"the paused microVM could not be resumed from disk: {error}",
                                      "a fresh VM starts on the next cell (reset() with the Python API); "
                                      "the paused state is lost"))

    async def resume(self) -> None:
        """Load the saved VM into a new VMM, reconnect, send what waited."""
        from smolvm_kernel.backends.qemu import QemuBackend

        h = self.hooks
        machine = h.machine()
        old = machine.backend
        t0 = time.monotonic()
        paused_s = t0 - (self.paused_at or t0)
        forked = old.spec.ram_file is not None or old.spec.ram_named
        spec = dataclasses.replace(old.spec, ram_file=None, ram_shared=False, ram_named=forked)
        state = spec.run_dir / STATE_FILE
        await machine.relaunch(QemuBackend(spec, old.binary, restore=PausedState(state)))
        state.unlink(missing_ok=True)
        self.paused_at = None
        self.last_resume_s = time.monotonic() - t0
        h.set_state(SandboxState.READY)
        self.touch()
        h.record("resume", paused_s=round(paused_s, 1), resume_s=round(self.last_resume_s, 3))
        h.notice(self.resume_note())
        machine.start_heartbeat()
        self._resume_held()

    def resume_note(self) -> str:
        """The line a cell gets after the resume it waited for."""
        return (f"[smolvm] this microVM was idle for {_human(self.idle_s or 0)} and was paused to disk; "
                f"resumed in {self.last_resume_s or 0:.2f} s\n")


def _cont(backend) -> None:
    """Let a VM whose save failed run again."""
    from smolvm_kernel.backends.qmp import QMP

    try:
        with QMP(backend.spec.run_dir / "qmp.sock") as qmp:
            qmp.execute("cont")
    except (OSError, SmolVMError, ValueError) as exc:
        log.warning("could not let VM run again after a failed pause: %s", exc)


def _human(seconds: float) -> str:
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
