"""What the guest says about itself, checked and put in words for the notebook.

The agent is root in the guest and guest code cannot reach its channel, but
the host still treats its word as data: every field is type-checked, only
known names count, and the words the notebook shows are the host's own. The
console is read only to name a cause (a panic, the agent's death).
"""

from __future__ import annotations

import dataclasses
import re

from smolvm_kernel.errors import GuestDied

#: The in-VM limits an agent "limit" event may name, in words.
LIMITS = {"processes": "processes and threads", "memory": "MiB of memory for the kernel and what it starts"}

#: What the guest agent's stats answer may contribute (see Sandbox.stats).
_GUEST_FIGURES = frozenset({"vcpus", "mem_total_kib", "mem_available_kib", "cpu_percent", "disk_total_bytes",
                            "disk_used_bytes", "uptime_s", "loadavg", "kernel_pid", "kernel_rss_kib",
                            "kernel_ready"})


@dataclasses.dataclass(frozen=True)
class News:
    """One agent event's meaning for the host: exactly one field is set."""

    ready: dict | None = None          # the guest kernel is ready; its kernel_info
    death: GuestDied | None = None     # the guest's kernel is gone
    note: str | None = None            # a line for the running cell(s)
    #: files in the notebook's folder in the VM that changed (path, size) and
    #: that are gone; not yet checked by the write-back rules (vm/workdir.py)
    workdir: tuple[tuple[tuple[str, int], ...], tuple[str, ...], bool] | None = None

#: Most paths one workdir event may name (the agent's own bound, guest/workdir.py).
MAX_WORKDIR_PATHS = 2000


def agent_event(event: dict, mem_mib: int, max_message_bytes: int) -> News | None:
    """An agent event, whatever it holds, as News (None: unknown or malformed)."""
    kind = event.get("event")
    if kind == "kernel_ready":
        info = event.get("kernel_info")
        return News(ready=info if isinstance(info, dict) else {})
    if kind == "kernel_died":
        code = event.get("code")
        status = f" (exit status {code})" if isinstance(code, int) and not isinstance(code, bool) else ""
        what = f"the guest's Python kernel died{status}"
        if event.get("oom") is True:
            what = (f"out of memory in the VM: the guest's Python kernel was killed by the VM's "
                    f"out-of-memory killer (the VM has {mem_mib} MiB; give it more with "
                    f"%smolvm config --mem or SandboxConfig.mem_mib, or use less)")
        return News(death=GuestDied(what, str(event.get("log", ""))[-3000:]))
    if kind == "dropped":
        size = event.get("size")
        return News(note=f"[smolvm] an output of {size if _is_int(size) else 'unknown'} bytes was dropped "
                         f"in the VM: it exceeds the {max_message_bytes}-byte message limit "
                         f"(max_message_bytes)\n")
    if kind == "workdir_changed":
        changed, removed = event.get("changed"), event.get("removed", [])
        if (isinstance(changed, list) and isinstance(removed, list)
                and len(changed) <= MAX_WORKDIR_PATHS and len(removed) <= MAX_WORKDIR_PATHS
                and all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and _is_int(c[1])
                        and c[1] >= 0 for c in changed)
                and all(isinstance(r, str) for r in removed)):
            return News(workdir=(tuple((c[0], c[1]) for c in changed), tuple(removed),
                                 event.get("truncated") is True))
        return None
    if kind == "limit":
        what, limit, killed = event.get("what"), event.get("limit"), event.get("killed")
        if _is_int(limit) and _is_int(killed) and isinstance(what, str) and what in LIMITS:
            if killed == 0 and what == "memory":
                # Nothing else to kill: the kernel itself holds the memory. It
                # was interrupted; if that does not free it, the VM's
                # out-of-memory killer ends it (and the host says so next).
                return News(note=f"[smolvm] this cell reached the VM's limit of {limit} {LIMITS[what]} "
                                 f"in the kernel itself: it was interrupted\n")
            return News(note=f"[smolvm] this cell reached the VM's limit of {limit} {LIMITS[what]}: "
                             f"it was interrupted and the {killed} processes it started were killed "
                             f"(the kernel and its variables are intact)\n")
    return None


def guest_figures(answer: dict) -> dict:
    """The guest's stats answer, cut to its own figures: numbers under known
    names (kernel_ready a bool), never a host field (backend, accel, pids,
    state ...), whatever the guest sent."""
    return {k: v for k, v in answer.items() if k in _GUEST_FIGURES
            and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                 or (k == "kernel_ready" and isinstance(v, bool)))}


def console_cause(console: str) -> str:
    """Why the guest went away, in words, from the end of its console ("" if unknown)."""
    panic = re.search(r"Kernel panic - not syncing: ([^\n\r]{0,200})", console)
    if panic:
        return f": the guest's Linux kernel panicked ({panic.group(1).strip()})"
    died = re.search(r"smolvm-init: (agent|dropbear) exited \((\d+)\)", console)
    if died:
        status = int(died.group(2))
        how = f"killed by signal {status & 0x7f}" if status & 0x7f else f"status {status >> 8}"
        return f": the guest's {'agent' if died.group(1) == 'agent' else 'SSH server'} died ({how})"
    return ""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
