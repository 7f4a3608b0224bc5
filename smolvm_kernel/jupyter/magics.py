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
``--name``.

Each ``--name`` gets its own microVM that lives as long as the host kernel.
Guest code never touches the host kernel's namespace: only its outputs come
back, as rich display, streams and errors.
"""

from __future__ import annotations

import getpass
import os
import sys
import threading
import time
import weakref

from smolvm_kernel.errors import SmolVMError
from smolvm_kernel.jupyter import hostline, transfer
from smolvm_kernel.jupyter.panel import ConfigActions

_sandboxes: dict = {}
_panels: dict = {}


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
        sb = Sandbox(**wanted)
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
    from smolvm_kernel.jupyter.output_policy import OutputPolicy

    policy = OutputPolicy.from_config(sb.config)
    for out in sb.execute(cell, timeout=args.settings.get("exec_timeout"), stdin=_stdin):
        if out.type == "error":
            raise GuestError(out.content)
        _show(out, policy)


def smolvm_line(line: str):
    """``%smolvm status|config|reset|stop|list|panel|push|pull|help [--name N]``."""
    args = hostline.parse(line, hostline.MAGIC)
    if args.command == "help":
        print(hostline.help_text(hostline.MAGIC))
        return
    if args.command == "list":
        if not _sandboxes:
            print("no sandboxes yet; run a %%smolvm cell")
        for name, sb in _sandboxes.items():
            print(f"{name:<12} {sb!r}")
        return
    if args.command == "panel":
        return show_panel(args.name, _get_sandbox(args))
    if args.command == "config":
        sb = _get_sandbox(args)
        if not args.settings:
            print(hostline.describe_config(sb.config))
            return
        changes = hostline.config_changes(args, sb.config)
        print(_actions(args.name, sb).apply(changes) if changes else "nothing to change")
        return
    sb = _get_sandbox(args, create=False)
    if sb is None:
        print(f"no sandbox named {args.name!r}; run a %%smolvm --name {args.name} cell first")
        return
    if args.command == "status":
        print(hostline.format_status(sb.stats()))
    elif args.command == "reset":
        sb.reset()
        print(f"sandbox {args.name!r}: fresh microVM ready in {sb.boot_seconds:.1f} s")
    elif args.command == "stop":
        sb.stop()
        print(f"sandbox {args.name!r} stopped")
    elif args.command in ("push", "pull"):
        if sb.state.value not in ("ready", "busy"):
            raise SmolVMError(f"sandbox {args.name!r} is {sb.state.value}; run a %%smolvm cell to start it")
        print(transfer.run(sb, os.getcwd(), args, sb.config.max_transfer_mib * 2**20))


def _actions(name: str, sandbox) -> SandboxActions:
    """The panel's actions over ``sandbox`` (its panel's, if one is shown)."""
    panel = _panels.get(name)
    if panel is not None and panel.actions.sandbox is sandbox:
        return panel.actions
    return SandboxActions(name, sandbox)


class SandboxActions(ConfigActions):
    """The panel's actions over one named Sandbox of this IPython kernel.

    Starts and stops run on a background thread, so a click never blocks
    the kernel; a thread refreshes the panel every couple of seconds for as
    long as the panel exists.
    """

    def __init__(self, name: str, sandbox) -> None:
        self.name = f"%%smolvm --name {name}"
        self.sandbox = sandbox
        self._busy = threading.Lock()
        self._op: str | None = None          # "booting" / "stopping" while a click's work runs
        self.on_change = lambda: None        # the panel refreshes itself through this

    @property
    def config(self):
        return self.sandbox.config

    def apply(self, changes: dict) -> str:
        from smolvm_kernel.jupyter.panel import _describe, apply_live, check_changes

        try:
            new = check_changes(self.sandbox.config, changes)
        except SmolVMError as exc:
            # On record, as the SmolVM kernel's own refusals are (audit log).
            self.sandbox.record_audit("refused", **self.sandbox.audit_context, what=_describe(changes),
                                      why=str(exc))
            raise
        running = self.sandbox.state.value in ("ready", "busy", "booting")
        restart = self.needs_restart(changes)
        self.sandbox.config = new
        if not restart:
            return apply_live(self.sandbox, changes)
        if not running:
            return f"saved {_describe(changes)}; the next %%smolvm cell starts a VM with them"
        self._background(self.sandbox.reset, "booting")
        return f"restarting the VM with {_describe(changes)}; its previous state is gone"

    def needs_restart(self, changes: dict) -> bool:
        from smolvm_kernel.jupyter.panel import needs_restart

        return needs_restart(changes, self.sandbox)

    def reset(self) -> str:
        self._background(self.sandbox.reset, "booting")
        return "resetting: a fresh microVM is starting"

    def teardown(self) -> str:
        self._background(self.sandbox.stop, "stopping")
        return "the VM is being destroyed; the next %%smolvm cell starts a fresh one"

    def _background(self, fn, state: str) -> None:
        def run():
            with self._busy:
                self._op = state
                self.on_change()
                try:
                    fn()
                except SmolVMError as exc:
                    print(f"[smolvm] {exc}", file=sys.stderr)
                finally:
                    self._op = None
                    self.on_change()
        threading.Thread(target=run, name="smolvm-panel-op", daemon=True).start()

    def status(self) -> dict:
        op = self._op
        try:
            stats = self.sandbox.stats() if op is None else {}
        except SmolVMError as exc:
            stats = {"error": str(exc)}
        stats["state"] = op or self.sandbox.state.value
        return stats


def show_panel(name: str, sandbox) -> None:
    """Display the control panel of sandbox ``name`` (one panel per sandbox, shown again on request)."""
    from IPython.display import display

    from smolvm_kernel.jupyter.panel import REFRESH_SECONDS, ControlPanel

    panel = _panels.get(name)
    if panel is None or panel.actions.sandbox is not sandbox:
        actions = SandboxActions(name, sandbox)
        panel = ControlPanel(actions)
        actions.on_change = lambda: panel.refresh(actions.status())
        actions.on_change()
        _panels[name] = panel
        ref = weakref.ref(panel)

        def refresh_loop():
            while True:
                time.sleep(REFRESH_SECONDS)
                p = ref()
                if p is None or _panels.get(name) is not p:
                    return
                p.refresh(p.actions.status())
        threading.Thread(target=refresh_loop, name=f"smolvm-panel-{name}", daemon=True).start()
    display(panel.widget)


def load_ipython_extension(ipython) -> None:
    ipython.register_magic_function(smolvm_cell, magic_kind="cell", magic_name="smolvm")
    ipython.register_magic_function(smolvm_line, magic_kind="line", magic_name="smolvm")


def unload_ipython_extension(ipython) -> None:
    _panels.clear()
    for sb in list(_sandboxes.values()):
        sb.stop()
    _sandboxes.clear()
