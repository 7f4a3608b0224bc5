"""The SmolVM kernel's ``%smolvm`` lines: in order among the cells, answered like cells.

A cell that is one ``%smolvm`` line runs on the host (actions.py says what
it does). :class:`LineRunner` keeps the order the frontend sent things in:
a line waits until the cells sent before it have finished, and shell
requests sent after it wait until it has (a panel click does not: it is not
a cell). A line that waits on the VM (status, push, pull) runs off the
kernel's loop. Its reply is a cell's: stdout or an error, an execute_reply
whose count is the guest's (the line goes into the guest's history as a
comment, so the notebook's In[] numbers stay the guest's), then idle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.vm.session import DELIM


def is_line(code: str) -> bool:
    """Whether a cell's ``code`` is one ``%smolvm`` line (which runs on the host)."""
    stripped = code.strip()
    return (stripped == "%smolvm" or stripped.startswith("%smolvm ")) and "\n" not in stripped


class LineRunner:
    """Runs the kernel's ``%smolvm`` lines on its loop, in the order sent.

    ``run_line(text)`` carries a line out (a text, or a callable that waits
    on the VM); ``relay`` answers the frontend and numbers the line in the
    guest; ``guest_ready()`` says whether a guest can number it;
    ``off_loop(fn)`` runs ``fn`` on the thread for work that waits on the
    VM and ``call_soon(fn, *args)`` brings its result back to the loop.
    """

    def __init__(self, run_line: Callable, relay, *, guest_ready: Callable[[], bool],
                 off_loop: Callable[[Callable[[], None]], None], call_soon: Callable[..., None],
                 cells_in_turn: Callable[[], bool] = lambda: False) -> None:
        self._run_line = run_line
        #: Whether every cell, like a line, waits for the cells sent before it
        #: (undo steps: each cell's step is the state the previous one left).
        self._cells_in_turn = cells_in_turn
        self._relay = relay
        self._guest_ready = guest_ready
        self._off_loop = off_loop
        self._call_soon = call_soon
        # Shell requests wait here while a line runs, and a line waits until
        # the cells sent before it have finished.
        self._held: list[list[bytes]] = []
        self._op: dict | None = None      # the line in progress: idents, header, code

    # -- the order

    def hold(self, frames: list[bytes]) -> bool:
        """Keep a shell request (still unverified) back if the order says so; True if kept."""
        if self._held or self._op is not None:
            # Panel clicks are not cells: they must work while a line runs.
            if self._is_click(frames):
                return False
        elif not (self._cells_pending() and self._waits(frames)):
            return False
        self._held.append(frames)   # after what was sent before it
        return True

    def release(self) -> Iterator[list[bytes]]:
        """The held shell requests that may go on now, in order (each handled before the next is asked for)."""
        while self._held and self._op is None:
            if self._cells_pending() and self._waits(self._held[0]):
                return   # a line waits for the cells sent before it
            yield self._held.pop(0)

    def _waits(self, frames: list[bytes]) -> bool:
        """Whether these frames wait for the cells sent before them."""
        kind = _request_kind(frames)
        return kind == "line" or (kind == "cell" and self._cells_in_turn())

    @property
    def busy(self) -> bool:
        """A line, or a pause_for's work, is in progress."""
        return self._op is not None

    def pause_for(self, work: Callable[[], object], then: Callable[[object], None]) -> None:
        """Hold the shell requests while ``work`` runs off the loop (an undo
        step before a cell); ``then(result)`` runs on the loop before any of
        them goes on. An exception of ``work`` is its result."""
        self._op = {"pause": True}

        def run() -> None:
            try:
                result = work()
            except Exception as exc:
                result = exc
            self._call_soon(self._resume, then, result)
        self._off_loop(run)

    def _resume(self, then: Callable[[object], None], result: object) -> None:
        self._op = None
        then(result)

    def _cells_pending(self) -> bool:
        return bool(self._relay.running_cells() or self._relay.backlog)

    def _is_click(self, frames: list[bytes]) -> bool:
        comms = self._relay.host_comms
        return comms is not None and any(comms.mentioned_in(f) for f in frames)

    # -- a line

    def run(self, idents: list[bytes], msg: dict) -> None:
        """Run the line of the execute_request ``msg`` (its busy already sent);
        the reply and the idle follow, now or once it is done."""
        header = msg["header"]
        code = msg["content"].get("code", "")
        self._op = {"idents": idents, "header": header, "code": code}
        try:
            result = self._run_line(code.strip()[len("%smolvm"):].strip())
        except SmolVMError as exc:
            return self._finish(None, exc)
        if not callable(result):
            return self._finish(result, None)

        def work() -> None:   # waits on the VM: off the loop
            try:
                self._call_soon(self._finish, result(), None)
            except SmolVMError as exc:
                self._call_soon(self._finish, None, exc)
            except Exception as exc:
                self._call_soon(self._finish, None, SmolVMError(f"{type(exc).__name__}: {exc}"))
        self._off_loop(work)

    def _finish(self, text: str | None, error: SmolVMError | None) -> None:
        op = self._op
        if op is None:
            return
        header, idents = op["header"], op["idents"]
        if error is None:
            status = {"status": "ok", "user_expressions": {}, "payload": []}
            if text:
                self._relay.publish("stream", {"name": "stdout", "text": text + "\n"}, header)
        else:
            status = {"status": "error", "ename": type(error).__name__, "evalue": str(error),
                      "traceback": [str(error)]}
            self._relay.publish("error", {k: status[k] for k in ("ename", "evalue", "traceback")}, header)

        def reply(count: int | None) -> None:
            self._op = None
            status["execution_count"] = count or self._relay.next_count()
            self._relay.reply("shell", idents, "execute_reply", status, header)
            self._relay.publish("status", {"execution_state": "idle"}, header)

        if self._guest_ready():
            # Number the line in the guest's own history, as a comment, so
            # that the notebook's counts stay those of the guest's In[]/Out[].
            self._relay.run_internal("# " + op["code"].strip() + "   (ran on the host)", reply)
        else:
            reply(None)


def _request_kind(frames: list[bytes]) -> str | None:
    """"line" for a %smolvm line, "cell" for another execute_request, else
    None. Unverified: this only orders requests; each is verified once,
    when it is handled."""
    try:
        i = frames.index(DELIM)
        header, content = json.loads(frames[i + 2]), json.loads(frames[i + 5])
        if header.get("msg_type") != "execute_request":
            return None
        return "line" if is_line(content.get("code", "")) else "cell"
    except (ValueError, IndexError, AttributeError, TypeError):
        return None
