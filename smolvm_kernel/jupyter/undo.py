"""Undo steps: a checkpoint of the VM before each cell, the last N kept.

With ``checkpoint_each_cell = N`` (``%smolvm config --undo N``), the owner
of a VM (the SmolVM kernel before it relays a cell, the ``%%smolvm`` magic
before it runs one) calls :meth:`UndoSteps.before_cell`; ``%smolvm undo``
restores the newest step and drops it, so each undo goes one cell further
back. The steps are checkpoints like any other (vm/checkpoints.py: the
user's disk, the policy's caps) named ``undo-<owner>-<n>``: one kernel's
steps are not another's, and they are removed when the owner ends.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.vm.checkpoints import UNDO_PREFIX, Checkpoint

log = logging.getLogger("smolvm_kernel.jupyter.undo")


class UndoSteps:
    """One owner's undo steps over its Sandbox.

    ``keep()`` is the setting now (0: off); ``owner`` tells this owner's
    steps apart from other kernels' (a kernel id, or a process id)."""

    def __init__(self, sandbox, owner: str | Callable[[], str], keep: Callable[[], int]) -> None:
        self.sandbox = sandbox
        self._owner = owner
        self._prefix = ""
        self._keep = keep
        self._n = 0
        #: The last step's failure, said once in the cell it was for.
        self.last_error: str | None = None
        #: A step taken ahead, right after a cell ended, that no cell has run
        #: after yet: it is the state now, not one to go back to.
        self.unused: str | None = None

    @property
    def prefix(self) -> str:
        """``undo-<owner>-``, fixed at first use (a kernel learns its id after it is made)."""
        if not self._prefix:
            owner = self._owner() if callable(self._owner) else self._owner
            self._prefix = f"{UNDO_PREFIX}{re.sub(r'[^A-Za-z0-9]', '', owner)[:12] or 'x'}-"
        return self._prefix

    @property
    def on(self) -> bool:
        return self._keep() > 0

    def steps(self) -> list[Checkpoint]:
        """This owner's steps, oldest first."""
        return [c for c in self.sandbox.checkpoints() if c.name.startswith(self.prefix)]

    def before_cell(self, last_cell: int | None, say: bool = True, ahead: bool = False) -> str | None:
        """Take a step now (the VM as the last cell left it). A note for the
        cell when no step could be taken (the cell runs). :meth:`prune`
        follows, once the cell is on its way."""
        self._n += 1
        name = f"{self.prefix}{self._n}"
        self.unused = None
        try:
            self.sandbox.checkpoint(name, after_cell=last_cell)
        except SmolVMError as exc:
            note = f"[smolvm] no undo step before this cell: {exc}\n"
            if not say:
                return note           # not said: the caller tries again before the cell
            if note == self.last_error:
                return None           # said once, not before every cell
            self.last_error = note
            return note
        self.last_error = None
        if ahead:
            self.unused = name
        return None

    def used(self) -> None:
        """A cell runs from the step taken ahead: it is an undo point now."""
        self.unused = None

    def prune(self) -> None:
        """Keep the newest N steps (removing one takes ~40 ms: not before a cell)."""
        self._prune(self._keep())

    def latest(self) -> Checkpoint:
        """The step ``%smolvm undo`` restores, or SmolVMError saying why there is none."""
        steps = self.steps()
        if steps and steps[-1].name == self.unused:
            self._remove(self.unused)       # the state now: nothing to go back to
            self.unused = None
            steps = steps[:-1]
        if steps:
            return steps[-1]
        if not self.on:
            raise SmolVMError("nothing to undo: undo steps are off; %smolvm config --undo 5 keeps a checkpoint "
                              "of the VM before each of the next 5 cells")
        raise SmolVMError("nothing to undo: no cell has run since undo steps were turned on, or every step "
                          "was undone already")

    def now_at(self, step: Checkpoint) -> int:
        """After its restore: the VM is that step's state, which the next cell
        starts from (it needs no step of its own) and the next undo skips.
        The steps left to go back to."""
        self.unused = step.name
        return len(self.steps()) - 1

    def clear(self) -> None:
        """The owner ends: the steps it took go."""
        if self._n:
            self._prune(0)

    def _prune(self, keep: int) -> None:
        steps = self.steps()
        for step in steps[:max(0, len(steps) - keep)]:
            self._remove(step.name)

    def _remove(self, name: str) -> None:
        try:
            self.sandbox.checkpoint_store.remove(name)
        except SmolVMError as exc:
            log.warning("could not remove undo step %s: %s", name, exc)
