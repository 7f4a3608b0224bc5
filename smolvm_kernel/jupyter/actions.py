"""What a ``%smolvm`` line or a panel button does to one VM, for every owner.

One :class:`VMActions` serves the SmolVM kernel's ``%smolvm`` lines, the
``%smolvm`` magic of an ordinary IPython kernel, and the control panel of
either (it is the panel's :class:`~smolvm_kernel.jupyter.panel.PanelActions`).
A line is read by :func:`hostline.parse` (the one grammar) and carried out
by :meth:`VMActions.run`; a button calls :meth:`~VMActions.apply`,
:meth:`~VMActions.reset` or :meth:`~VMActions.teardown`.

What differs between the owners is how they run a VM, and that is the
owner's :class:`VMControl`:

- the SmolVM kernel's :class:`~smolvm_kernel.jupyter.supervisor.VMSupervisor`
  starts and stops on its worker and returns at once: a line says that a VM
  is starting, and the next cell waits for it;
- the magic's one Sandbox (:class:`~smolvm_kernel.jupyter.magics.MagicVM`)
  starts and stops in the calling thread: a line waits in its cell, and a
  button's work runs on a thread of its own, so a click never blocks the
  kernel.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from smolvm_kernel.config import LIVE_SETTINGS, USER_SETTINGS, SandboxConfig
from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.jupyter import hostline, transfer
from smolvm_kernel.jupyter.undo import UndoSteps
from smolvm_kernel.vm.workdir import size_words

#: What a restore does not take back, said in its cell.
NOT_ROLLED_BACK = ("not rolled back: files already copied to the notebook's folder, the notebook itself, "
                   "anything sent over the network; widgets shown after that checkpoint no longer answer "
                   "(run their cells again)")


class VMControl(Protocol):
    """How an owner runs its VM, as the actions drive it."""

    #: The Sandbox (the same object across restarts).
    sandbox: object
    #: The settings the next start uses; the actions assign a changed copy.
    config: SandboxConfig
    #: Whether restart() and stop() return only once done (and a line waits in
    #: its cell), or at once, the work going on elsewhere.
    waits: bool

    @property
    def torn_down(self) -> bool:
        """No VM runs and none starts until asked: a new setting waits for the next start."""

    def state(self) -> str:
        """booting / ready / busy / paused / stopping / stopped / dead."""

    def stats(self) -> dict:
        """Sandbox.stats() (``{"error": ...}`` if that failed) with ``state`` as the owner knows it."""

    def ensure(self) -> None:
        """Start the VM unless it runs, or raise SmolVMError saying how to start it."""

    def restart(self, why: str) -> None:
        """A fresh VM with the current settings; requests still open end with ``why``."""

    def stop(self, why: str) -> None:
        """Destroy the VM; requests still open end with ``why``."""

    def wait_ready(self) -> None:
        """Wait (off the kernel's loop) for a start under way; raise its error."""

    def replace(self, fn: Callable[[], object]) -> Future:
        """Replace the VM by ``fn()`` (Sandbox.restore), in order with starts
        and stops, requests for the VM waiting meanwhile: a Future of its
        result (done already when the owner waits)."""


class VMActions:
    """The ``%smolvm`` lines and the panel's buttons over one owner's VM.

    ``where`` is where lines are read (hostline.KERNEL or MAGIC); ``name``
    titles the panel; ``workdir()`` is the folder push and pull stay in;
    ``show_panel()`` displays the panel (and sets :attr:`panel`).

    Example::

        actions = VMActions(supervisor, hostline.KERNEL, name="this kernel's microVM",
                            workdir=os.getcwd, show_panel=show)
        actions.run_line("config --mem 1024")   # 'restarting the VM with memory 1024 MiB; ...'
    """

    def __init__(self, vm: VMControl, where: str, *, name: str, workdir: Callable[[], str],
                 show_panel: Callable[[], None], last_cell: Callable[[], int | None] = lambda: None,
                 undo: UndoSteps | None = None,
                 later: Callable[[Callable[[], str], Callable[[str, bool], None]], None] | None = None,
                 undone: Callable[[], None] = lambda: None) -> None:
        self.vm = vm
        self.where = where
        self.name = name
        self._workdir = workdir
        self._show_panel = show_panel
        #: The number of the last cell that ran (a checkpoint is "after cell [N]").
        self._last_cell = last_cell
        self.undo = undo
        #: later(work, done): run ``work`` where it may wait on the VM, then
        #: ``done(text, error)`` where the owner's widgets are updated (the
        #: kernel: its ops thread, then its loop); by default a thread.
        self._later = later or _on_a_thread
        #: After an undo: the VM is an undo step's state (the kernel's next cell needs no step).
        self._undone = undone
        #: The control panel over these actions, once shown (its settings follow a change).
        self.panel = None

    @property
    def sandbox(self):
        return self.vm.sandbox

    @property
    def config(self) -> SandboxConfig:
        return self.vm.config

    # -- lines

    def run_line(self, line: str) -> str | Callable[[], str]:
        """Run the line after ``%smolvm``; see :meth:`run`."""
        return self.run(hostline.parse(line, self.where))

    def run(self, cmd: hostline.HostLine) -> str | Callable[[], str]:
        """Carry out one parsed line: the text to print, or a callable that
        waits on the VM (to run off the kernel's loop) and returns it."""
        if cmd.command == "help":
            return hostline.help_text(self.where)
        if cmd.command == "status":
            return lambda: hostline.format_status(self.status())
        if cmd.command == "reset":
            self.vm.restart("the VM was reset by %smolvm reset")
            if self.vm.waits:
                return f"fresh microVM ready in {self.sandbox.boot_seconds or 0:.1f} s"
            return "resetting: a fresh microVM is starting; the next cell runs in it"
        if cmd.command == "start":
            if self.vm.state() in ("booting", "ready", "busy", "paused"):
                return "the microVM is already running"
            self.vm.ensure()
            return "starting a fresh microVM; the next cell runs in it"
        if cmd.command == "stop":
            self.vm.stop("the VM was stopped by %smolvm stop")
            return "microVM stopped; " + self._restart_hint()
        if cmd.command == "config":
            if not cmd.settings:
                return hostline.describe_config(self.config)
            changes = hostline.config_changes(cmd, self.config)
            return self.apply(changes) if changes else "nothing to change"
        if cmd.command == "panel":
            self._show_panel()
            return ""
        if cmd.command in ("push", "pull"):
            workdir = self._workdir()
            transfer.check(workdir, cmd)     # refused before anything waits on the VM
            self.vm.ensure()

            def move() -> str:
                self.vm.wait_ready()
                return transfer.run(self.sandbox, workdir, cmd, self.config.max_transfer_mib * 2**20)
            return move
        if cmd.command == "checkpoints":
            return lambda: hostline.format_checkpoints(self.sandbox.checkpoints(), time.time())
        if cmd.command == "checkpoint" and cmd.remove:
            return lambda: f"removed checkpoint {cmd.source!r} ({size_words(self.sandbox.remove_checkpoint(cmd.source))} freed)"
        if cmd.command == "checkpoint":
            return self.checkpoint(cmd.source or None)
        if cmd.command == "restore":
            return self.restore(cmd.source)
        if cmd.command == "undo":
            return self.undo_last()
        raise SmolVMError(f"%smolvm {cmd.command} is not for {self.name}; {hostline.usage(self.where)}")

    # -- checkpoints (vm/checkpoints.py; the panel's buttons too)

    def checkpoint(self, name: str | None) -> Callable[[], str]:
        self.vm.ensure()
        after = self._last_cell()

        def take() -> str:
            self.vm.wait_ready()
            ck = self.sandbox.checkpoint(name, after_cell=after)
            return (f"checkpoint {ck.name!r} saved in {ck.save_s:.2f} s ({size_words(ck.size)} on disk); "
                    f"%smolvm restore {ck.name} brings this state back, here or in another of your notebooks")
        return take

    def restore(self, name: str) -> Callable[[], str]:
        """Replace the VM with checkpoint ``name`` (a callable that waits for it)."""
        ck = self.sandbox.checkpoint_store.open(name)      # refused at once if it is not there
        started = time.monotonic()
        done = self.vm.replace(lambda: self.sandbox.restore(ck.name))

        def wait() -> str:
            done.result()
            return (f"restored {ck.describe()}, in {time.monotonic() - started:.1f} s\n"
                    f"{NOT_ROLLED_BACK}")
        return wait

    def undo_last(self) -> Callable[[], str]:
        if self.undo is None:
            raise SmolVMError(f"%smolvm undo is not for {self.name}")
        step = self.undo.latest()
        started = time.monotonic()
        done = self.vm.replace(lambda: self.sandbox.restore(step.name))

        def wait() -> str:
            done.result()
            left = self.undo.now_at(step)
            self._undone()
            after = f"after cell [{step.after_cell}]" if step.after_cell else "before the last cell"
            return (f"undone: the VM is back to its state {after}, in {time.monotonic() - started:.1f} s "
                    f"({left} more undo step{'s' if left != 1 else ''})\n{NOT_ROLLED_BACK}")
        return wait

    def status(self) -> dict:
        """Sandbox.stats() with the owner's state (safe from any thread)."""
        return self.vm.stats()

    def panel_status(self) -> dict:
        """status(), and the checkpoints as the panel lists them (safe from any thread)."""
        stats = self.status()
        try:
            now = time.time()
            stats["checkpoints"] = [(ck.name, f"{ck.name} ({ck.taken(now)}, {size_words(ck.size)})")
                                    for ck in reversed(self.sandbox.checkpoints())]
        except SmolVMError:
            stats["checkpoints"] = []
        return stats

    def checkpoint_button(self, action: str, name: str | None, done: Callable[[str, bool], None]) -> None:
        """A panel button: checkpoint / restore / delete / undo, as their lines."""
        try:
            if action == "checkpoint":
                work = self.checkpoint(None)
            elif action == "restore":
                work = self.restore(name or "")
            elif action == "delete":
                work = self.run(hostline.HostLine("checkpoint", (name or "",), remove=True))
            elif action == "undo":
                work = self.undo_last()
            else:
                raise SmolVMError(f"no such checkpoint action {action!r}")
        except SmolVMError as exc:
            return done(str(exc), True)
        self._later(work, done)

    def _restart_hint(self) -> str:
        if self.where == hostline.MAGIC:
            return "the next %%smolvm cell starts a fresh one"
        if self.config.on_stopped == "error":
            return "run %smolvm start to start a fresh one"
        return "the next cell starts a fresh one"

    # -- settings (the panel's PanelActions, and %smolvm config)

    def settings(self) -> dict:
        return {k: getattr(self.config, k) for k in USER_SETTINGS}

    def limits(self) -> dict:
        return {k: getattr(self.config, k) for k in ("max_vcpus", "max_mem_mib", "max_disk_mib")}

    def check(self, changes: dict) -> None:
        check_changes(self.config, changes)

    def needs_restart(self, changes: dict) -> bool:
        return needs_restart(changes, self.sandbox if self.vm.state() in ("ready", "busy") else None)

    def apply(self, changes: dict) -> str:
        """Validate and apply; restart the VM unless only live settings changed.

        A refused change is put on record (the audit log), as every owner's is."""
        try:
            new = check_changes(self.config, changes)
        except SmolVMError as exc:
            self.sandbox.record_audit("refused", **self.sandbox.audit_context, what=describe(changes),
                                      why=str(exc))
            raise
        restart = self.needs_restart(changes)
        self.vm.config = self.sandbox.config = new
        text = None
        if not restart:
            text = apply_live(self.sandbox, changes)
            self.vm.config = self.sandbox.config    # the balloon keeps its size there
        if self.panel is not None:
            self.panel.load_settings()
        if text is not None:
            return text
        if self.vm.torn_down:
            return f"saved {describe(changes)}; the VM is stopped and starts with them next time"
        why = f"the VM was restarted with new settings ({describe(changes)})"
        self._soon(lambda: self.vm.restart(why))
        return f"restarting the VM with {describe(changes)}; its previous state is gone"

    # -- the panel's buttons

    def reset(self) -> str:
        self._soon(lambda: self.vm.restart("the VM was reset from the control panel"))
        return "resetting: a fresh microVM is starting"

    def teardown(self) -> str:
        self._soon(lambda: self.vm.stop("the VM was torn down from the control panel"))
        return "the VM is being destroyed; " + self._restart_hint()

    def _soon(self, fn: Callable[[], None]) -> None:
        """Start ``fn`` without waiting for it: a VM that waits gets a thread."""
        if not self.vm.waits:
            fn()
            return

        def run() -> None:
            try:
                fn()
            except SmolVMError as exc:     # nobody waits for it: say it where the kernel prints
                print(f"[smolvm] {exc}", file=sys.stderr)
        threading.Thread(target=run, name="smolvm-panel-op", daemon=True).start()


def check_changes(config: SandboxConfig, changes: dict) -> SandboxConfig:
    """``config`` with ``changes`` applied, or ConfigError/NetworkError naming the fix.

    Beyond ranges and the host's limits, turning networking on checks that
    this host can give it (privilege, nft, /dev/net/tun) before any restart.
    """
    new = config.changed(**changes)
    if "network" in changes and new.network != "none":
        from smolvm_kernel.host.net import check_host
        check_host(new.netns)
    return new


def needs_restart(changes: dict, sandbox=None) -> bool:
    """Whether ``changes`` need a fresh VM: not a timeout, nor a memory size the
    running VM's balloon can reach (down from, or back up to, its boot size)."""
    for name, value in changes.items():
        if name in LIVE_SETTINGS:
            continue
        if name == "mem_mib" and sandbox is not None and sandbox.can_resize_live(value):
            continue
        return True
    return False


def apply_live(sandbox, changes: dict) -> str:
    """Apply changes that need no restart to the running ``sandbox`` (its config
    already holds them); the message for the user."""
    if "mem_mib" in changes:
        got = sandbox.set_memory(changes["mem_mib"])
        return (f"{describe(changes)}: applied live, the VM keeps its state (the balloon "
                f"now leaves the guest {got} MiB)")
    return f"{describe(changes)}: applied without a restart"


def describe(changes: dict) -> str:
    """``{"mem_mib": 1024}`` as the user reads it: ``memory 1024 MiB``."""
    names = {"vcpus": "vCPUs", "mem_mib": "memory", "disk_mib": "disk", "exec_timeout": "cell timeout",
             "network": "network"}
    units = {"mem_mib": " MiB", "disk_mib": " MiB", "exec_timeout": " s"}
    return ", ".join(f"{names.get(k, k)} {v}{units.get(k, '')}" for k, v in changes.items())


def outcome(work: Callable[[], str]) -> tuple[str, bool]:
    """Run a button's ``work``: (its text, False), or (what went wrong, True)."""
    try:
        return work(), False
    except SmolVMError as exc:
        return str(exc), True
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", True


def _on_a_thread(work: Callable[[], str], done: Callable[[str, bool], None]) -> None:
    threading.Thread(target=lambda: done(*outcome(work)), name="smolvm-panel-op", daemon=True).start()
