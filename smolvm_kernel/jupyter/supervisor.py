"""The kernel's one VM: its starts and stops in order, the boot line, timeouts, deaths.

:class:`VMSupervisor` owns the relaying kernel's Sandbox. Every start and
stop runs in order on one worker thread, and the kernel's loop hears when
each ends; while a cell waits for a boot, its progress line shows in that
cell and is cleared before the cell's own outputs. On the loop's tick it
interrupts a cell past ``exec_timeout`` (and replaces a VM that ignores the
interrupt), and it ends the waiting requests when the VM dies or its VMM is
stopped, with one line that says what happened (and an audit entry).

It knows the kernel only through the callables it is given: run something
on the kernel's loop, publish on IOPub, ask about and end the requests in
flight, and say that the VM's state changed or that a fresh VM is ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from smolvm_kernel import timeline
from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import SmolVMError

log = logging.getLogger("smolvm_kernel.jupyter.supervisor")

#: A start that takes longer than this shows a progress line in the cell
#: (cleared once the VM is ready); a restore from a ready snapshot shows nothing.
BOOT_NOTE_AFTER_S = 1.0


class VMSupervisor:
    """The kernel's Sandbox: starts and stops in order, off the kernel's loop.

    Every method but :meth:`wait_ready` and :meth:`stats` runs on the
    kernel's loop thread; the worker thread hands its results back through
    ``call_soon``. It is the kernel's actions.VMControl.
    """

    #: restart() and stop() return at once; the next cell waits for the VM.
    waits = False

    def __init__(self, sandbox_factory: Callable, config: SandboxConfig, *,
                 call_soon: Callable[..., None],
                 publish: Callable[[str, dict, dict], None],
                 fail_requests: Callable[[SmolVMError], None],
                 cells_running: Callable[[], int],
                 overdue: Callable[[float, float], list],
                 on_change: Callable[[], None],
                 on_ready: Callable[[], None],
                 config_error: SmolVMError | None = None) -> None:
        """``call_soon(fn, *args)`` runs ``fn`` on the kernel's loop (from any
        thread); ``publish(msg_type, content, parent)`` sends on IOPub;
        ``fail_requests(error)`` ends every open request with ``error``;
        ``cells_running()`` counts the cells in the VM and ``overdue(limit,
        now)`` lists those running past ``limit`` seconds; ``on_change()``
        follows every change of :meth:`state`, ``on_ready()`` a good boot
        (its progress line already cleared)."""
        self.config = config
        #: A setting that is wrong (a config file, a SMOLVM_* variable): every
        #: start fails with it, so each cell says what to fix (the kernel runs
        #: on the built-in defaults meanwhile and never boots a VM with them).
        self.config_error = config_error
        self._call_soon = call_soon
        self._publish = publish
        self._fail_requests = fail_requests
        self._cells_running = cells_running
        self._overdue = overdue
        self._on_change = on_change
        self._on_ready = on_ready
        self.sandbox = sandbox_factory(config, progress=lambda line: call_soon(self._progress, line))
        self.sandbox.on_death = lambda err: call_soon(self._died, err)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="smolvm-vm")
        self._booting = False
        self._stopping = False
        self._torn_down = False          # stopped on purpose; the next cell follows config.on_stopped
        self._ready_event = threading.Event()   # set when a boot ends, well or not
        self._boot_error: SmolVMError | None = None
        self._boot_started = 0.0
        self._progress_line = ""
        self._boot_display: tuple[str, dict] | None = None   # display_id, parent
        self._boot_shown = False         # whether the boot line is on the page
        self._last_tick = time.monotonic()
        self._last_vmm_check = 0.0
        self._vmm_stopped_since: float | None = None

    # -- state

    def guest_ready(self) -> bool:
        """Whether a request sent now reaches a running guest."""
        from smolvm_kernel.vm.sandbox import SandboxState

        # A paused VM counts: the sandbox holds what is sent and resumes it (pause.py).
        return (self.sandbox.state in (SandboxState.READY, SandboxState.BUSY, SandboxState.PAUSED)
                and not self._booting and not self._stopping)

    def state(self) -> str:
        """booting / ready / busy / stopping / stopped / dead, as the panel shows it."""
        if self._stopping:
            return "stopping"
        if self._booting:
            return "booting"
        state = self.sandbox.state.value
        if state == "ready" and self._cells_running():
            return "busy"
        return state

    def stats(self) -> dict:
        """Sandbox.stats() with the state as the loop knows it (safe from any thread)."""
        try:
            stats = self.sandbox.stats()
        except SmolVMError as exc:
            stats = {"error": str(exc)}
        stats["state"] = self.state()
        return stats

    @property
    def booting(self) -> bool:
        return self._booting

    @property
    def torn_down(self) -> bool:
        """Stopped on purpose and not starting again: the next cell follows ``config.on_stopped``."""
        return self._torn_down and not self._booting

    # -- starts and stops, in order in the worker

    def ensure(self) -> None:
        """Boot (or re-boot after a death) in the worker; never blocks the loop."""
        if self._booting or self.guest_ready():
            return
        self._start(restart=False)

    def restart(self, why: str) -> None:
        """A fresh VM with the current settings; open requests end with ``why``."""
        from smolvm_kernel.errors import SandboxStopped

        self._fail_requests(SandboxStopped(why))
        self._start(restart=True)

    def stop(self, why: str) -> None:
        """Destroy the VM (Teardown, %smolvm stop); the loop does not wait for it."""
        from smolvm_kernel.errors import SandboxStopped

        self._fail_requests(SandboxStopped(why))
        self._stopping = True
        self._torn_down = True
        self._ready_event.clear()

        def stop() -> None:
            self.shutdown()
            self._call_soon(self._stopped)

        self._worker.submit(stop)
        self._on_change()

    def shutdown(self) -> None:
        """Stop the VM now, in the calling thread (the kernel exits, or the VM is beyond saving)."""
        try:
            self.sandbox.stop()
        except Exception as exc:  # the process is exiting either way
            log.warning("stopping the VM failed: %s", exc)

    def wait_ready(self) -> None:
        """Wait (any thread but the loop) for the boot under way; raise its error."""
        from smolvm_kernel.errors import SandboxStopped

        if not self._ready_event.wait(self.config.boot_timeout):
            raise SandboxStopped("the microVM did not become ready; see the first cell's output")
        if self._boot_error is not None:
            raise self._boot_error

    def interrupt(self) -> None:
        """Interrupt the guest's running cell; never waits behind a boot in the worker."""
        if self.guest_ready():
            threading.Thread(target=self._interrupt_now, daemon=True).start()

    def _interrupt_now(self) -> None:
        try:
            self.sandbox.interrupt()
        except Exception as exc:
            log.warning("interrupting the guest failed: %s", exc)

    def _start(self, restart: bool) -> None:
        from smolvm_kernel.vm.sandbox import SandboxState

        self._booting = True
        self._torn_down = False
        self._ready_event.clear()
        self._boot_started = time.monotonic()
        replace = restart or self.sandbox.state == SandboxState.DEAD

        def boot() -> None:
            try:
                if self.config_error is not None:
                    raise type(self.config_error)("", None, str(self.config_error))   # a fresh one each time
                if replace:
                    self.sandbox.reset()
                else:
                    self.sandbox.start()
                self._call_soon(self._booted, None)
            except SmolVMError as exc:
                self._call_soon(self._booted, exc)
            except Exception as exc:  # report any failure in the notebook
                self._call_soon(self._booted, SmolVMError(f"{type(exc).__name__}: {exc}"))

        self._worker.submit(boot)
        self._on_change()

    def replace(self, fn: Callable[[], object]) -> Future:
        """Replace the VM by ``fn()`` (a checkpoint's restore) in the worker, in
        order with starts and stops; requests wait for it as for a boot. A
        Future of its result. A restore refused before the VM was touched
        leaves it running, and the requests go on to it."""
        from smolvm_kernel.vm.sandbox import SandboxState

        self._booting = True
        self._torn_down = False
        self._ready_event.clear()
        self._boot_started = time.monotonic()
        future: Future = Future()

        def work() -> None:
            try:
                result = fn()
            except BaseException as exc:
                error = exc if isinstance(exc, SmolVMError) else SmolVMError(f"{type(exc).__name__}: {exc}")
                running = self.sandbox.state in (SandboxState.READY, SandboxState.BUSY)
                self._call_soon(self._booted, None if running else error)
                future.set_exception(error)
                return
            self._call_soon(self._booted, None)
            future.set_result(result)
        self._worker.submit(work)
        self._on_change()
        return future

    def _booted(self, error: SmolVMError | None) -> None:
        timeline.mark("VM ready (kernel loop)")
        self._booting = False
        self._on_change()
        self._boot_error = error
        self._ready_event.set()         # wakes a %smolvm push/pull waiting for the VM
        self._clear_boot_progress()     # on an error, the cell's error says what failed
        if error is not None:
            self._fail_requests(error)
            return
        self._on_ready()

    def _stopped(self) -> None:
        self._stopping = False
        self._on_change()

    def _died(self, error: SmolVMError) -> None:
        if not self._booting and not self._stopping:
            self._fail_requests(error)
            self._on_change()

    # -- the boot line in the cell that waits

    def show_boot_in(self, header: dict) -> bool:
        """Let the request ``header`` (an execute_request waiting for the VM)
        carry the boot line; False if another request already does."""
        if self._boot_display is not None:
            return False
        # Say busy for the request now; the guest's own "busy" for it is dropped.
        # The progress line itself appears only once the start takes a while
        # (BOOT_NOTE_AFTER_S), and is cleared when the VM is ready: a saved
        # notebook holds the cell's own outputs only, as under a local kernel.
        self._publish("status", {"execution_state": "busy"}, header)
        self._boot_display = (f"smolvm-boot-{header['msg_id']}", header)
        self._boot_shown = False
        return True

    def accel_label(self) -> str:
        backend = self.sandbox.backend
        if backend is None:
            return self.config.backend
        return f"{backend.name}/{backend.spec.accel}"

    def _progress(self, line: str) -> None:
        self._progress_line = line
        self._show_boot_progress()

    def _show_boot_progress(self) -> None:
        """Show or update the boot line of the cell that waits for the VM."""
        if self._boot_display is None:
            return
        display_id, parent = self._boot_display
        elapsed = time.monotonic() - self._boot_started
        if not self._boot_shown and elapsed < BOOT_NOTE_AFTER_S:
            return
        step = self._progress_line or f"starting microVM ({self.accel_label()})"
        text = f"{step}… {elapsed:.1f} s"
        content = {"data": {"text/plain": text}, "metadata": {}, "transient": {"display_id": display_id}}
        self._publish("update_display_data" if self._boot_shown else "display_data", content, parent)
        self._boot_shown = True

    def _boot_note_due(self, now: float) -> bool:
        return (self._boot_display is not None and not self._boot_shown
                and now - self._boot_started >= BOOT_NOTE_AFTER_S)

    def _clear_boot_progress(self) -> None:
        """The VM is ready: remove the boot line before the cell's own outputs."""
        if self._boot_display is not None and self._boot_shown:
            self._publish("clear_output", {"wait": False}, self._boot_display[1])
        self._boot_display = None
        self._boot_shown = False

    # -- the loop's tick: the boot line's clock, timeouts, a stopped VMM

    def tick(self, now: float) -> None:
        """Called by the kernel's loop every poll (at least every 250 ms)."""
        if self._booting and (now - self._last_tick >= 1.0 or self._boot_note_due(now)):
            self._last_tick = now
            self._show_boot_progress()
        if self.config.exec_timeout and not self._booting:
            self._enforce_timeout(now)
        if now - self._last_vmm_check >= 1.0 and not self._booting and self._cells_running():
            self._last_vmm_check = now
            self._watch_vmm()

    def _watch_vmm(self) -> None:
        """A VMM that is stopped (SIGSTOP, a debugger) runs no guest: the cells
        waiting on it would wait forever. Report it and replace the VM."""
        from smolvm_kernel.errors import GuestDied
        from smolvm_kernel.host.procs import process_state

        pid = self.sandbox.backend.pid if self.sandbox.backend is not None else None
        if pid is None or process_state(pid) not in ("T", "t"):
            self._vmm_stopped_since = None
            return
        now = time.monotonic()
        if self._vmm_stopped_since is None:
            self._vmm_stopped_since = now
            return
        if now - self._vmm_stopped_since >= 1.0:
            self._vmm_stopped_since = None
            error = GuestDied(
                f"the microVM's VMM (pid {pid}) is stopped (SIGSTOP or a debugger) and runs no guest",
                "the VM was destroyed; the next cell starts a fresh one")
            self.sandbox.record_audit("death", vm_id=self.sandbox.vm_id, **self.sandbox.audit_context,
                                      cause=str(error).splitlines()[0])
            self._fail_requests(error)
            self.shutdown()     # SIGKILL reaches a stopped process

    def _enforce_timeout(self, now: float) -> None:
        """Interrupt a cell past exec_timeout; reset the VM if it ignores that."""
        from smolvm_kernel.errors import ExecutionTimeout
        from smolvm_kernel.vm.sandbox import INTERRUPT_GRACE_S

        limit = self.config.exec_timeout
        for req in self._overdue(limit, now):
            if req.interrupted_at is None:
                req.interrupted_at = now
                self._publish("stream", {"name": "stderr", "text":
                              f"[smolvm] this cell exceeded its {limit:g} s timeout; interrupting it\n"},
                              req.header)
                self.interrupt()
            elif now - req.interrupted_at > INTERRUPT_GRACE_S:
                # The guest did not come back: replace the VM.
                self.sandbox.record_audit("death", vm_id=self.sandbox.vm_id, **self.sandbox.audit_context,
                                          cause=f"timeout: a cell ran past exec_timeout={limit:g} s and did "
                                                f"not stop when interrupted; the VM was destroyed")
                self._fail_requests(ExecutionTimeout(limit, reset=True))
                # Synchronous (about a second): the next cell must find the
                # VM stopped, so that it boots a fresh one.
                self.shutdown()
                return
