"""``%%smolvm`` and ``%smolvm``: the same sandbox from an ordinary IPython kernel.

Example::

    %load_ext smolvm_kernel

    %%smolvm --name scratch --mem 1024
    import os; print(os.uname().release)

    %smolvm status --name scratch        the VM's state, resources and uptime
    %smolvm panel --name scratch         a control panel: live status, resources, Reset, Teardown
    %smolvm push data.csv --name scratch copy a file from this folder into the VM
    %smolvm pull out.png --name scratch  copy a file out of the VM into this folder
    %smolvm config --name scratch --mem 2048   show or change its settings
    %smolvm reset|stop|list|help

The lines are the SmolVM kernel's (one grammar: hostline.py), each with
``--name``, and do what they do there (one set of actions: actions.py), but
for a line that starts or stops a VM waiting for it in its cell.

Each ``--name`` gets its own microVM that lives as long as the host kernel.
Guest code never touches the host kernel's namespace: only its outputs come
back, as rich display, streams and errors.
"""

from __future__ import annotations

import atexit
import getpass
import os
import sys
import threading
import time
import weakref
from concurrent.futures import Future

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.jupyter import hostline
from smolvm_kernel.jupyter.actions import VMActions
from smolvm_kernel.jupyter.undo import UndoSteps

#: name -> its Sandbox
_sandboxes: dict = {}
#: name -> the VMActions over that Sandbox (with its panel, once shown)
_actions: dict = {}


class GuestError(Exception):
    """An exception raised by guest code; IPython shows the guest's traceback."""

    def __init__(self, content: dict) -> None:
        self.content = content
        super().__init__(f"{content.get('ename')}: {content.get('evalue')}")

    def _render_traceback_(self) -> list[str]:
        tb = self.content.get("traceback")
        if isinstance(tb, list) and all(isinstance(line, str) for line in tb):
            return tb or [str(self)]
        return [str(self)]


def _get_sandbox(line: hostline.HostLine, create: bool = True):
    from smolvm_kernel.config import SandboxConfig
    from smolvm_kernel.vm.sandbox import Sandbox

    sb = _sandboxes.get(line.name)
    if line.command == "config":     # a config line changes the sandbox's settings, it does not remake it
        wanted = {}
    else:
        wanted = {k: v for k, v in line.settings.items() if k in ("vcpus", "mem_mib", "profile")}
    if sb is not None and wanted and any(getattr(sb.config, k) != v for k, v in wanted.items()):
        sb.stop()      # new resources: a new VM
        sb = None
    if sb is None:
        if not create:
            return None
        config = SandboxConfig(**wanted)
        if not config.workdir:       # this kernel's working directory is the VM's (vm/workdir.py)
            config.workdir = os.getcwd()
        sb = Sandbox(config)
        _sandboxes[line.name] = sb
    return sb


def _show(out, policy) -> None:
    """Republish one guest output in this (host) kernel, through the output policy."""
    from IPython.display import publish_display_data

    c = out.content
    if out.type == "stream":
        text = c.get("text", "")
        (sys.stderr if c.get("name") == "stderr" else sys.stdout).write(text if isinstance(text, str) else "")
    elif out.type in ("display_data", "execute_result", "update_display_data"):
        data, metadata = policy.bundle(c.get("data"), c.get("metadata"))
        kwargs = {"metadata": metadata}
        transient = c.get("transient")
        if isinstance(transient, dict) and transient:
            kwargs["transient"] = transient
        if out.type == "update_display_data":
            kwargs["update"] = True
        publish_display_data(data, **kwargs)
        for note in policy.notes:
            print(note, file=sys.stderr)
        policy.notes.clear()
    elif out.type == "clear_output":
        from IPython.display import clear_output
        clear_output(wait=bool(c.get("wait")))


def _stdin(prompt: str, password: bool) -> str:
    # Say who asks: a password prompt from guest code is not the host's.
    prompt = "[microVM] " + (prompt if isinstance(prompt, str) else "")
    return getpass.getpass(prompt) if password else input(prompt)


def smolvm_cell(line: str, cell: str):
    """Run the cell body in the named microVM (started on first use)."""
    args = hostline.parse(line, hostline.CELL)
    sb = _get_sandbox(args)
    if sb.state.value in ("stopped", "dead"):
        t0 = time.monotonic()
        print(f"[smolvm] starting microVM {args.name!r}…", file=sys.stderr, flush=True)
        if sb.state.value == "dead":
            sb.reset()
        else:
            sb.start()
        print(f"[smolvm] ready in {time.monotonic() - t0:.1f} s "
              f"({sb.backend.name}/{sb.backend.spec.accel})", file=sys.stderr, flush=True)
    notes, sb.start_notes = sb.start_notes, []
    for text in notes:
        print(text, end="", file=sys.stderr, flush=True)
    from smolvm_kernel.jupyter.output_policy import OutputPolicy

    undo = _actions_for(args.name, sb).undo
    if undo.on:        # an undo step: the VM as the cells before this one left it
        note = undo.before_cell(_last_cell())
        if note:
            print(note, end="", file=sys.stderr, flush=True)
        threading.Thread(target=undo.prune, name="smolvm-undo-prune", daemon=True).start()
    policy = OutputPolicy.from_config(sb.config)
    for out in sb.execute(cell, timeout=args.settings.get("exec_timeout"), stdin=_stdin):
        if out.type == "error":
            raise GuestError(out.content)
        _show(out, policy)


def smolvm_line(line: str):
    """``%smolvm status|config|reset|stop|list|panel|push|pull|help [--name N]``."""
    args = hostline.parse(line, hostline.MAGIC)
    if args.command == "help":      # needs no sandbox
        print(hostline.help_text(hostline.MAGIC))
        return
    if args.command == "list":
        if not _sandboxes:
            print("no sandboxes yet; run a %%smolvm cell")
        for name, sb in _sandboxes.items():
            print(f"{name:<12} {sb!r}")
        return
    # config and panel make the sandbox (its VM starts with a cell); the rest need one
    sb = _get_sandbox(args, create=args.command in ("config", "panel"))
    if sb is None:
        print(f"no sandbox named {args.name!r}; run a %%smolvm --name {args.name} cell first")
        return
    out = _actions_for(args.name, sb).run(args)
    if callable(out):
        out = out()
    if out:
        print(out)


def _last_cell() -> int | None:
    """The number of the last cell this IPython kernel ran (the one before the running one)."""
    from IPython import get_ipython

    shell = get_ipython()
    count = getattr(shell, "execution_count", None)
    return count - 1 if isinstance(count, int) and count > 1 else None


def _actions_for(name: str, sandbox) -> VMActions:
    """The actions over sandbox ``name`` (made again when the sandbox was remade)."""
    actions = _actions.get(name)
    if actions is None or actions.sandbox is not sandbox:
        actions = VMActions(MagicVM(name, sandbox), hostline.MAGIC, name=f"%%smolvm --name {name}",
                            workdir=os.getcwd, show_panel=lambda: show_panel(name, sandbox),
                            last_cell=_last_cell,
                            undo=UndoSteps(sandbox, f"m{os.getpid()}{name}",
                                           keep=lambda: sandbox.config.checkpoint_each_cell))
        _actions[name] = actions
    return actions


class MagicVM:
    """One named Sandbox of this IPython kernel, as the actions drive it
    (actions.VMControl): starts and stops run in the calling thread, one at
    a time, and the panel shows them as booting or stopping meanwhile."""

    #: restart() and stop() return once done: a line waits in its cell (a
    #: panel's button runs them on a thread of their own, actions.py).
    waits = True

    def __init__(self, name: str, sandbox) -> None:
        self.name = name
        self.sandbox = sandbox
        self._busy = threading.Lock()
        self._op: str | None = None          # "booting" / "stopping" while a start or stop runs
        self.on_change = lambda: None        # the panel refreshes itself through this

    @property
    def config(self):
        return self.sandbox.config

    @config.setter
    def config(self, value) -> None:
        self.sandbox.config = value

    def state(self) -> str:
        return self._op or self.sandbox.state.value

    @property
    def torn_down(self) -> bool:
        return self.state() not in ("ready", "busy", "booting")

    def stats(self) -> dict:
        op = self._op
        try:
            stats = self.sandbox.stats() if op is None else {}
        except SmolVMError as exc:
            stats = {"error": str(exc)}
        stats["state"] = op or self.sandbox.state.value
        return stats

    def ensure(self) -> None:
        """A magic sandbox starts with a %%smolvm cell, not with a line."""
        state = self.state()
        if state not in ("ready", "busy"):
            raise SmolVMError(f"sandbox {self.name!r} is {state}; run a %%smolvm cell to start it")

    def restart(self, why: str) -> None:
        self._run(self.sandbox.reset, "booting")

    def stop(self, why: str) -> None:
        self._run(self.sandbox.stop, "stopping")

    def wait_ready(self) -> None:
        """Starts are done when restart() returns: nothing to wait for."""

    def replace(self, fn) -> Future:
        """Run ``fn`` (a restore) now, shown as booting; its result, done."""
        future: Future = Future()
        try:
            self._run(lambda: future.set_result(fn()), "booting")
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def _run(self, fn, state: str) -> None:
        with self._busy:
            self._op = state
            self.on_change()
            try:
                fn()
            finally:
                self._op = None
                self.on_change()


def show_panel(name: str, sandbox) -> None:
    """Display the control panel of sandbox ``name`` (one panel per sandbox, shown again on request)."""
    from IPython.display import display

    from smolvm_kernel.jupyter.panel import REFRESH_SECONDS, ControlPanel

    actions = _actions_for(name, sandbox)
    if actions.panel is None:
        panel = actions.panel = ControlPanel(actions)
        actions.vm.on_change = lambda: panel.refresh(actions.panel_status())
        actions.vm.on_change()
        ref = weakref.ref(actions)

        def refresh_loop():
            while True:
                time.sleep(REFRESH_SECONDS)
                a = ref()
                if a is None or _actions.get(name) is not a:
                    return
                a.panel.refresh(a.panel_status())
        threading.Thread(target=refresh_loop, name=f"smolvm-panel-{name}", daemon=True).start()
    display(actions.panel.widget)


def load_ipython_extension(ipython) -> None:
    ipython.register_magic_function(smolvm_cell, magic_kind="cell", magic_name="smolvm")
    ipython.register_magic_function(smolvm_line, magic_kind="line", magic_name="smolvm")
    atexit.register(_clear_undo_steps)


def _clear_undo_steps() -> None:
    """This kernel's undo steps end with it (named checkpoints stay)."""
    for actions in list(_actions.values()):
        if actions.undo is not None:
            actions.undo.clear()


def unload_ipython_extension(ipython) -> None:
    _clear_undo_steps()
    _actions.clear()
    for sb in list(_sandboxes.values()):
        sb.stop()
    _sandboxes.clear()
