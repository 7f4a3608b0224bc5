"""``%smolvm`` lines: one grammar for the SmolVM kernel, the ``%smolvm`` magic and the panel.

A line is a command and its arguments, split like a shell would (``shlex``):

    %smolvm status | panel | reset | stop | start | list | help
    %smolvm config [--cpus N] [--mem MiB] [--disk MiB] [--timeout S] [--network none|nat]
    %smolvm push LOCAL [REMOTE]
    %smolvm pull REMOTE [LOCAL] [--force]
    %smolvm checkpoint [NAME] | checkpoint --rm NAME | checkpoints | restore NAME | undo

In an ordinary IPython kernel (the magic) every line may also name its
sandbox (``--name N``) and the shape a new one gets (``--cpus``, ``--mem``,
``--timeout``, ``--profile``), and ``%%smolvm`` takes those options alone.
:func:`parse` turns a line into a :class:`HostLine` or raises SmolVMError
with the usage of the command at hand; :func:`help_text` is the help both
show; :func:`format_status` and :func:`describe_config` are the texts of
``status`` and ``config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from smolvm_kernel.config.options import LINE_OPTIONS, USER_SETTINGS
from smolvm_kernel.errors import SmolVMError

#: Where a line is read: the SmolVM kernel, the line magic, the cell magic.
KERNEL, MAGIC, CELL = "kernel", "magic", "cell"

#: option -> (the SandboxConfig setting it sets, its type), from the settings table.
SETTINGS = {option: (row.name, row.python_type) for option, row in LINE_OPTIONS.items()}
#: The settings `config` may change (the profile is a kernelspec's, not a line's).
CONFIG_SETTINGS = USER_SETTINGS
#: The options that choose a magic sandbox's shape when it is (re)made.
_SHAPE_OPTIONS = ("--cpus", "--mem", "--timeout", "--profile")
#: ``[--cpus N] [--mem MiB] ...``: what `config` and ``%%smolvm`` take.
_CONFIG_USAGE = " ".join(row.usage for row in LINE_OPTIONS.values() if row.name in CONFIG_SETTINGS)
_CELL_USAGE = " ".join(["[--name N]", *(LINE_OPTIONS[option].usage for option in _SHAPE_OPTIONS)])

#: command -> (its arguments, what it does, where it exists)
COMMANDS: dict[str, tuple[str, str, frozenset[str]]] = {
    "status": ("", "the VM: state, backend/accelerator, vCPUs, memory, CPU, disk, uptime",
               frozenset({KERNEL, MAGIC})),
    "panel": ("", "a control panel: live status, resources, Reset, Teardown", frozenset({KERNEL, MAGIC})),
    "config": (_CONFIG_USAGE,
               "without options: the settings and this host's limits; with them: change them "
               "(a new VM; a timeout, or less memory, applies live)", frozenset({KERNEL, MAGIC})),
    "reset": ("", "replace the VM with a fresh one (all its state is lost)", frozenset({KERNEL, MAGIC})),
    "stop": ("", "destroy the VM", frozenset({KERNEL, MAGIC})),
    "start": ("", "start a VM after a stop", frozenset({KERNEL})),
    "list": ("", "this kernel's sandboxes, by name", frozenset({MAGIC})),
    "push": ("LOCAL [REMOTE]", "copy a file from the notebook's folder into the VM (home or /tmp)",
             frozenset({KERNEL, MAGIC})),
    "pull": ("REMOTE [LOCAL] [--force]", "copy a file out of the VM into the notebook's folder "
             "(--force replaces)", frozenset({KERNEL, MAGIC})),
    "checkpoint": ("[NAME] [--rm]", "save the VM's whole state as NAME (default: the last cell's number); "
                   "--rm deletes it", frozenset({KERNEL, MAGIC})),
    "checkpoints": ("", "your checkpoints: name, when, after which cell, size", frozenset({KERNEL, MAGIC})),
    "restore": ("NAME", "replace the VM with a checkpoint's state (any of your kernels' checkpoints)",
                frozenset({KERNEL, MAGIC})),
    "undo": ("", "back to the state before the last cell (with --undo N set in %smolvm config)",
             frozenset({KERNEL, MAGIC})),
    "help": ("", "this text", frozenset({KERNEL, MAGIC})),
}


@dataclasses.dataclass(frozen=True)
class HostLine:
    """One parsed line."""

    command: str
    paths: tuple[str, ...] = ()
    force: bool = False
    #: The magic's sandbox (``--name``); the kernel has one VM.
    name: str = "default"
    #: SandboxConfig settings the line names (``--mem 1024`` -> ``{"mem_mib": 1024}``).
    settings: dict = dataclasses.field(default_factory=dict)
    #: ``checkpoint --rm NAME``.
    remove: bool = False

    @property
    def source(self) -> str:
        return self.paths[0] if self.paths else ""

    @property
    def destination(self) -> str | None:
        return self.paths[1] if len(self.paths) > 1 else None


def usage(where: str, command: str | None = None) -> str:
    """The usage of ``command`` (or of every command) where it is read."""
    name = " [--name N]" if where != KERNEL else ""
    if where == CELL:
        return f"usage: %%smolvm {_CELL_USAGE}"
    if command in COMMANDS:
        return f"usage: %smolvm {command} {COMMANDS[command][0]}".rstrip() + name
    verbs = "|".join(c for c, (_, _, at) in COMMANDS.items() if where in at)
    return f"usage: %smolvm {verbs} ...{name} (%smolvm help says more)"


def help_text(where: str) -> str:
    """Every command of the line, one per row, as the kernel and the magic show it."""
    rows = []
    for command, (args, what, at) in COMMANDS.items():
        if where not in at:
            continue
        left = f"%smolvm {command} {args}".rstrip()
        rows.append(f"{left:<31}{what}" if len(left) < 31 else f"{left}\n{'':<31}{what}")
    if where == KERNEL:
        rows.append("Only these lines run on the host; everything else in a cell runs inside the microVM.")
    else:
        rows.insert(0, f"%%smolvm {_CELL_USAGE}\n"
                       f"{'':<31}run the cell in the named microVM (started on first use)")
        rows.append("Every line takes --name N (default: 'default'); each name is a microVM of its own that "
                    "lives as long as this kernel.")
    return "\n".join(rows)


def _parser(where: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="%%smolvm" if where == CELL else "%smolvm", add_help=False,
                                exit_on_error=False)
    if where != KERNEL:
        p.add_argument("--name", default="default")
    for option, (dest, kind) in SETTINGS.items():
        if where == CELL and option not in _SHAPE_OPTIONS:
            continue
        p.add_argument(option, dest=dest, type=kind)
    if where != CELL:
        p.add_argument("--force", action="store_true")
        p.add_argument("--rm", action="store_true")
        p.add_argument("words", nargs="*")
    return p


def parse(line: str, where: str = KERNEL) -> HostLine:
    """The line after ``%smolvm`` (or ``%%smolvm``), read where it was written."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise SmolVMError(f"cannot parse {line!r}: {exc}") from None
    parser = _parser(where)
    try:
        ns, extra = parser.parse_known_intermixed_args(words)
    except (argparse.ArgumentError, SystemExit) as exc:      # a value of the wrong type
        raise SmolVMError(f"{exc}; {usage(where, _first_word(words))}") from None
    if extra:
        raise SmolVMError(f"unknown %smolvm arguments {' '.join(extra)!r}; {usage(where, _first_word(words))}")
    settings = {dest: getattr(ns, dest) for dest, _ in SETTINGS.values()
                if getattr(ns, dest, None) is not None}
    name = getattr(ns, "name", "default")
    if where == CELL:
        return HostLine("run", name=name, settings=settings)
    command, *paths = ns.words or ["help"]
    if command not in COMMANDS or where not in COMMANDS[command][2]:
        raise SmolVMError(f"unknown %smolvm command {command!r}; try %smolvm help")
    if ns.force and command != "pull":
        raise SmolVMError(f"--force is for pull only; {usage(where, command)}")
    if ns.rm and command != "checkpoint":
        raise SmolVMError(f"--rm is for checkpoint only; {usage(where, command)}")
    if command in ("push", "pull"):
        if not 1 <= len(paths) <= 2:
            raise SmolVMError(f"{usage(where, command)}; got {line!r}")
    elif command in ("checkpoint", "restore"):
        need = (1, 1) if command == "restore" or ns.rm else (0, 1)
        if not need[0] <= len(paths) <= need[1]:
            raise SmolVMError(f"{usage(where, command)}; got {line!r}"
                              + ("" if paths or command == "checkpoint" else " (%smolvm checkpoints lists them)"))
    elif paths:
        raise SmolVMError(f"%smolvm {command} takes no {' '.join(paths)!r}; {usage(where, command)}")
    if where == KERNEL and command != "config" and settings:
        raise SmolVMError(f"options such as {', '.join(sorted(settings))} go with %smolvm config; "
                          f"{usage(where, 'config')}")
    if command == "config" and "profile" in settings:
        raise SmolVMError("the profile is the kernel's (its kernelspec), not a setting to change: pick "
                          "the kernel of that profile instead (SmolVM Python (scipy), ...)")
    return HostLine(command, tuple(paths), bool(ns.force), name=name, settings=settings, remove=bool(ns.rm))


def _first_word(words: list[str]) -> str | None:
    return next((w for w in words if not w.startswith("-")), None)


def format_status(stats: dict) -> str:
    """``%smolvm status``: Sandbox.stats() as a few readable lines."""
    def mib(kib):
        return f"{kib / 1024:.0f} MiB" if kib else "?"

    lines = [f"state      {stats.get('state')}  (vm {stats.get('vm_id') or '-'})",
             f"backend    {stats.get('backend') or '-'} / {stats.get('accel') or '-'}"
             f"  transport {stats.get('transport') or '-'}  network {stats.get('network')}"]
    if stats.get("accel_reason"):
        lines.append(f"           {stats['accel_reason']}")
    if stats.get("error"):     # the figures could not be read
        lines.append(f"error      {stats['error']}")
    if "mem_total_kib" in stats:
        used = stats["mem_total_kib"] - stats.get("mem_available_kib", 0)
        lines += [
            f"vCPUs      {stats.get('vcpus')}   CPU {stats.get('cpu_percent') or 0:.0f}%",
            f"memory     {mib(used)} used of {mib(stats['mem_total_kib'])}",
            f"disk       {stats.get('disk_used_bytes', 0) / 2**20:.0f} MiB used of "
            f"{stats.get('disk_total_bytes', 0) / 2**20:.0f} MiB",
            f"uptime     {stats.get('vm_uptime_s') or stats.get('uptime_s', 0):.0f} s   "
            f"started in {stats.get('boot_seconds') or 0:.1f} s ({stats.get('started_from') or '-'})",
        ]
    else:
        lines.append(f"vCPUs      {stats.get('configured_vcpus')}   memory "
                     f"{stats.get('configured_mem_mib')} MiB (configured)")
    if stats.get("cgroup"):
        lines.append(f"host limit {stats['cgroup']}")
    if stats.get("paused_state_bytes"):
        lines.append(f"paused     to disk while idle ({stats['paused_state_bytes'] / 2**20:.0f} MiB, saved in "
                     f"{stats.get('last_pause_s') or 0:.1f} s); the next cell resumes it")
    elif stats.get("pause_after_s"):
        lines.append(f"idle pause after {stats['pause_after_s']:g} s idle"
                     + (f" (off: {stats['pause_note']})" if stats.get("pause_note") else "")
                     + (f"; last resume {stats['last_resume_s']:.2f} s" if stats.get("last_resume_s") else ""))
    return "\n".join(lines)


def describe_config(c) -> str:
    """``%smolvm config`` without options: a SandboxConfig's settings and its limits."""
    return (f"vCPUs {c.vcpus} (limit {c.max_vcpus})   memory {c.mem_mib} MiB (limit {c.max_mem_mib})"
            f"   disk {c.disk_mib} MiB (limit {c.max_disk_mib})\n"
            f"cell timeout {c.exec_timeout:g} s (0 = none)   network {c.network}   "
            f"profile {c.profile} (here: {', '.join(_profiles_here())})   after a stop: {c.on_stopped}"
            + (f"\ncaps from {c.policy.whose}: "
               + ", ".join(f"{k}={'/'.join(v) if isinstance(v, tuple) else v}"
                           for k, v in c.policy.caps().items()) if c.policy else ""))


def _profiles_here() -> list[str]:
    """The built-in profiles and the course images of this host's image cache."""
    from smolvm_kernel.images import ImageCache

    return list(ImageCache().profiles())


def config_changes(line: HostLine, config) -> dict:
    """What a ``config`` line would change in ``config`` (settings equal to today's left out)."""
    return {k: v for k, v in line.settings.items() if k in CONFIG_SETTINGS and getattr(config, k) != v}


def format_checkpoints(checkpoints: list, now: float) -> str:
    """``%smolvm checkpoints``: one row each, oldest first."""
    if not checkpoints:
        return ("no checkpoints yet: %smolvm checkpoint [NAME] saves the VM's state "
                "(%smolvm config --undo N keeps one before each of the last N cells)")
    rows = [f"{'name':<20} {'taken':<14} {'after':<8} {'size':>8}  shape"]
    for ck in checkpoints:
        when = ck.taken(now)
        after = f"[{ck.after_cell}]" if ck.after_cell else "-"
        rows.append(f"{ck.name:<20} {when:<14} {after:<8} {ck.size / 2**20:>5.0f} MiB  "
                    f"{ck.profile}, {ck.vcpus} vCPU, {ck.mem_mib} MiB" + ("  (undo)" if ck.undo else ""))
    total = sum(ck.size for ck in checkpoints)
    rows.append(f"{len(checkpoints)} checkpoint(s), {total / 2**20:.0f} MiB; %smolvm restore NAME, "
                f"%smolvm checkpoint --rm NAME")
    return "\n".join(rows)
