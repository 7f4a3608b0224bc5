"""The settings table: every SandboxConfig setting, declared once.

A row names a setting, its type and built-in default, the ``SMOLVM_*``
variable that stands in when nothing else sets it, its short name as a
kernelspec option (``smolvm-kernel install --mem``, ``kernelspec.install(mem=)``)
and as a ``%smolvm`` line's option (``--mem``), and one line of help. From
the rows come SandboxConfig's traits and their ``@default``s (sandbox_config.py),
``kernelspec.OPTION_ENV``, the ``%smolvm`` options (jupyter/hostline.py), the
settings a user may change on a running kernel, and the settings the
instructor's policy checks when a user chose them (caps.py).

Ranges and other checks of the values are checks.py's.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import shutil
from typing import Callable

from traitlets import Bool, Enum, Float, Int, List, TraitError, TraitType, Unicode

from smolvm_kernel.images.recipe import PROFILES

MAX_VCPUS = 32
MIN_MEM_MIB, MAX_MEM_MIB = 192, 65536
MIN_DISK_MIB, MAX_DISK_MIB = 64, 1024 * 1024

#: Set while SandboxConfig.builtin() reads its defaults: no SMOLVM_* variable counts then.
IGNORE_ENV = contextvars.ContextVar("smolvm_ignore_env", default=False)

_TRUE = ("1", "true", "yes")


def env(name: str) -> str | None:
    """The variable's value; None when it is unset, empty, or ignored (IGNORE_ENV)."""
    if IGNORE_ENV.get():
        return None
    value = os.environ.get(name)
    return value if value not in (None, "") else None


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its trait, its default, its variable, and where else it is named."""

    name: str
    #: "int", "float", "str", "bool" or "list" (of str): the trait, and how the variable reads.
    kind: str
    #: The value when nothing sets it: a value, or a function of the host (called when needed).
    default: object
    help: str
    #: The SMOLVM_* variable read before the default (None: there is none).
    env: str | None = None
    #: For an Enum: the values it takes.
    choices: tuple[str, ...] | None = None
    #: Its short name as a kernelspec option and, with ``line``, as a %smolvm option (--NAME).
    option: str | None = None
    kernelspec: bool = False
    line: bool = False
    #: What a usage line shows for its value (an Enum shows its choices).
    metavar: str = ""
    #: A user may change it on a running kernel (panel, %smolvm config); ``live``: without a fresh VM.
    user: bool = False
    live: bool = False
    #: The instructor's policy caps it: a value the user chose (given, or its variable set) is
    #: checked against the cap; one they did not is brought within it (caps.py).
    capped: bool = False
    #: The help's words for a default that is a function of the host.
    default_note: str = ""

    def builtin(self) -> object:
        """The built-in default, without the variable."""
        value = self.default() if callable(self.default) else self.default
        return list(value) if isinstance(value, tuple) else value

    def from_env(self) -> object:
        """The default: the variable read as this setting's kind, else the built-in one.

        A variable that is not of the kind raises TraitError naming it and the fix.
        """
        value = env(self.env) if self.env else None
        if value is None:
            return self.builtin()
        if self.kind in ("int", "float"):
            try:
                return int(value) if self.kind == "int" else float(value)
            except ValueError:
                what = "a whole number" if self.kind == "int" else "a number"
                raise TraitError(f"{self.env}={value!r} is not {what}; unset it or give e.g. "
                                 f"{self.builtin()}") from None
        if self.kind == "bool":
            return value in _TRUE
        if self.kind == "list":
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def dynamic(self) -> bool:
        """Whether the trait needs a @default: a variable, or a default of the host."""
        return self.env is not None or callable(self.default)

    @property
    def python_type(self) -> type:
        return {"int": int, "float": float}.get(self.kind, str)

    @property
    def usage(self) -> str:
        """``[--mem MiB]``: the option as a usage line shows it."""
        return f"[--{self.option} {self.metavar or '|'.join(self.choices or ())}]"

    def full_help(self) -> str:
        """The help, with the variable and its default."""
        text = self.help.rstrip(".")
        if self.env is None:
            return text + "."
        if self.kind == "bool":
            return f"{text} (env {self.env}=1)."
        if self.kind == "list":
            shown = f"comma-separated; default {','.join(self.default)!r}"
        elif callable(self.default):
            shown = f"default: {self.default_note}"
        else:
            shown = f"default {self.default:g}" if self.kind == "float" else f"default {self.default!r}"
        return f"{text} (env {self.env}; {shown})."

    def trait(self) -> TraitType:
        """The traitlets trait (config=True); a dynamic default comes from its @default."""
        static = {} if self.dynamic else {"default_value": self.builtin()}
        if self.choices:
            trait = Enum(list(self.choices), help=self.full_help(), **static)
        elif self.kind == "list":
            trait = List(Unicode(), help=self.full_help(), **static)
        else:
            kind = {"int": Int, "float": Float, "str": Unicode, "bool": Bool}[self.kind]
            trait = kind(help=self.full_help(), **static)
        return trait.tag(config=True)


def _host_mem_mib() -> int:
    from smolvm_kernel.host.procs import meminfo_mib

    return meminfo_mib("MemTotal", 4096)


def _max_vcpus() -> int:
    return min(MAX_VCPUS, max(2, os.cpu_count() or 1))


def _max_mem_mib() -> int:
    return max(MIN_MEM_MIB, min(MAX_MEM_MIB, _host_mem_mib() // 2))


def _on_path(binary: str) -> Callable[[], str]:
    return lambda: shutil.which(binary) or binary


_ROWS = (
    # The VM's shape.
    Option("vcpus", "int", 2, "Virtual CPUs of the VM.", env="SMOLVM_VCPUS",
           option="cpus", kernelspec=True, line=True, metavar="N", user=True, capped=True),
    Option("mem_mib", "int", 512, "Guest memory in MiB.", env="SMOLVM_MEM_MIB",
           option="mem", kernelspec=True, line=True, metavar="MiB", user=True, capped=True),
    Option("disk_mib", "int", 2048, "Size of the per-VM scratch disk in MiB; sparse, so unused space "
           "costs nothing.", env="SMOLVM_DISK_MIB",
           option="disk", kernelspec=True, line=True, metavar="MiB", user=True, capped=True),
    Option("profile", "str", "base", "Guest image profile: " + ", ".join(PROFILES) + ", or a course image "
           "built with `smolvm-kernel image build --profile NAME --from FOLDER`.", env="SMOLVM_PROFILE",
           option="profile", kernelspec=True, line=True, metavar="|".join(PROFILES) + "|COURSE", capped=True),
    # How it runs.
    Option("backend", "str", "auto", "VMM: auto picks Firecracker where it can run, else QEMU.",
           env="SMOLVM_BACKEND", choices=("auto", "qemu", "firecracker"), option="backend", kernelspec=True),
    Option("accel", "str", "auto", "Accelerator: auto probes KVM by booting a tiny guest and falls back "
           "to TCG.", env="SMOLVM_ACCEL", choices=("auto", "kvm", "hvf", "tcg")),
    # A cold TCG boot reaches a ready ipykernel in 8-13 s on 2 cores; leave room for a loaded CI host.
    Option("boot_timeout", "float", 90.0, "Seconds to wait for the guest kernel to answer after launch.",
           env="SMOLVM_BOOT_TIMEOUT"),
    Option("exec_timeout", "float", 0.0, "Default per-execution wall-clock limit in seconds; 0 means none.",
           env="SMOLVM_TIMEOUT", option="timeout", kernelspec=True, line=True, metavar="S",
           user=True, live=True, capped=True),
    Option("pause_after", "float", 0.0, "Seconds a VM may sit idle (no cell running, no message either way) "
           "before it is paused to disk, its host memory freed; its next use resumes it, state intact. "
           "0 = never. VMs with a network are not paused.", env="SMOLVM_PAUSE_AFTER"),
    Option("checkpoint_each_cell", "int", 0, "Undo steps: before each cell the kernel keeps a checkpoint "
           "of the VM, for the last N cells, and %smolvm undo restores the state from before the last one "
           "(vm/checkpoints.py). 0 = off; each step costs a save of the VM before its cell.",
           env="SMOLVM_CHECKPOINT_EACH_CELL", option="undo", kernelspec=True, line=True, metavar="N",
           user=True, live=True),
    # The network.
    Option("network", "str", "none", "Guest networking: none (the default: no NIC at all) or nat (one TAP, "
           "NAT egress through nftables, no VM-to-VM, no host, no 169.254/16; needs CAP_NET_ADMIN).",
           env="SMOLVM_NETWORK", choices=("none", "nat"), option="network", kernelspec=True, line=True,
           user=True, capped=True),
    # The notebook's folder (vm/workdir.py).
    Option("workdir", "str", "", "A host folder copied into the VM's home when it starts, as its working "
           "folder; files the code writes there come back by the write-back rules. The kernel and %%smolvm "
           "use their own working directory (the notebook's folder); empty for a Python caller: none.",
           env="SMOLVM_WORKDIR"),
    Option("workdir_mode", "str", "read-write", "The working folder: read-write (copied in; what the code "
           "writes comes back), read-only (copied in; nothing comes back) or off (not copied).",
           env="SMOLVM_WORKDIR_MODE", choices=("read-write", "read-only", "off"), option="workdir",
           kernelspec=True, line=True, user=True, capped=True),
    Option("transport", "str", "auto", "How the host reaches the guest agent: auto = vsock where the "
           "backend has it, else virtio-serial (QEMU); ssh = paramiko over the VM's NIC with pinned keys "
           "(needs network='nat').", env="SMOLVM_TRANSPORT", choices=("auto", "serial", "vsock", "ssh"),
           option="transport", kernelspec=True),
    Option("netns", "str", "", "Put the VM's TAP, rules and NAT in this named network namespace "
           "(/run/netns/NAME) instead of the host's.", env="SMOLVM_NETNS", option="netns", kernelspec=True),
    Option("net_pool", "str", "10.213.0.0/16", "Private IPv4 pool the VMs' /30 links are leased from; "
           "leases never overlap a route of the namespace."),
    Option("egress_allow", "list", (), "With network='nat': if set, the VM may reach only these "
           "('CIDR' or 'CIDR:port,port'); otherwise any address but the always-blocked ones."),
    Option("net_max_connections", "int", 512, "With network='nat': most connections (TCP, UDP flows) the "
           "VM may have open through the host at once; more are dropped."),
    Option("net_connection_rate", "int", 100, "With network='nat': most new connections a second the VM "
           "may open through the host (bursts up to as many); more are dropped."),
    Option("dns", "list", ("host",), "Name servers written into a networked guest's resolv.conf: IPv4 "
           "addresses, or 'host' (the host's own non-loopback name servers at VM start); [] or ['none'] = "
           "no DNS (names resolve only from the guest's /etc/hosts). With egress_allow, a server is used "
           "only if the allowlist lets port 53 through.", env="SMOLVM_DNS"),
    # The host's programs and the guest image.
    Option("qemu_path", "str", _on_path("qemu-system-x86_64"), "The qemu-system binary.",
           env="SMOLVM_QEMU", default_note="qemu-system-x86_64 on PATH"),
    Option("firecracker_path", "str", _on_path("firecracker"), "The firecracker binary.",
           env="SMOLVM_FIRECRACKER", default_note="firecracker on PATH"),
    Option("auto_build", "bool", False, "Build the guest image on first use if it is missing.",
           env="SMOLVM_AUTO_BUILD"),
    Option("debug_console", "bool", False, "Verbose guest kernel console (loglevel=7) for boot debugging.",
           env="SMOLVM_DEBUG_CONSOLE"),
    Option("snapshot", "str", "auto", "Start and reset from a ready snapshot of this VM shape, restored in "
           "under a second. auto: a shape without one cold-boots at once and its snapshot is built in the "
           "background for the next start; wait: build it first, then restore; off: always cold boot.",
           env="SMOLVM_SNAPSHOT", choices=("auto", "wait", "off")),
    Option("on_stopped", "str", "start", "After the VM is torn down (panel Teardown, %smolvm stop): start a "
           "fresh one for the next cell, or answer it with an error that says how to start one.",
           env="SMOLVM_ON_STOPPED", choices=("start", "error")),
    # What of the VM's output reaches the frontend.
    Option("output_policy", "str", "safe", "What of the VM's output a frontend may render: safe (the "
           "default: scripts, JavaScript outputs, event handlers, unknown widget modules and %smolvm lines "
           "in payloads are blocked, HTML/SVG/Markdown sanitised; see smolvm_kernel/jupyter/output_policy.py) "
           "or trusted (everything passes, and guest code can run JavaScript in your browser with your "
           "Jupyter session: only for code you trust).", env="SMOLVM_OUTPUT_POLICY",
           choices=("safe", "trusted"), option="output_policy", kernelspec=True, capped=True),
    Option("output_allow_mimes", "list", (), "Mime types to let through under the safe policy besides the "
           "built-in safe ones, e.g. ['application/vnd.plotly.v1+json'] (their renderer runs in your "
           "browser)."),
    Option("widget_modules", "list", ("@jupyter-widgets/base", "@jupyter-widgets/controls",
                                      "@jupyter-widgets/output"),
           "Widget model/view modules the VM's widgets may use under the safe policy (a frontend loads "
           "the module's code)."),
    # The host's limits: what a user may ask for from the panel, %smolvm config
    # or a kernelspec. Set by whoever runs the host.
    Option("max_vcpus", "int", _max_vcpus, "Most vCPUs one VM may have.", env="SMOLVM_MAX_VCPUS",
           default_note="the host's cores"),
    Option("max_mem_mib", "int", _max_mem_mib, "Most guest memory one VM may have, in MiB.",
           env="SMOLVM_MAX_MEM_MIB", default_note="half the host's memory"),
    Option("max_disk_mib", "int", 16384, "Largest scratch disk one VM may have, in MiB.",
           env="SMOLVM_MAX_DISK_MIB"),
    Option("max_transfer_mib", "int", 64, "Largest file %smolvm push/pull moves, in MiB (at most 256)."),
    Option("max_output_mib", "int", 16, "Most output one cell may send to the frontend, in MiB (streams, "
           "displays, results); beyond it the rest is dropped and the cell says how much.",
           env="SMOLVM_MAX_OUTPUT_MIB", capped=True),
    Option("vmm_overhead_mib", "int", 256, "Host memory the VMM process may use beyond the guest's RAM, in "
           "MiB (its cgroup's memory limit is mem_mib plus this; QEMU under TCG needs about 130).",
           env="SMOLVM_VMM_OVERHEAD_MIB"),
    Option("cpu_limit", "float", 0.0, "Host CPU the VMM may use, in cores (its cgroup's CPU quota; 0: one "
           "core per vCPU).", env="SMOLVM_CPU_LIMIT"),
    Option("max_message_bytes", "int", 32 * 1024 * 1024, "Largest message accepted from the guest; larger "
           "ones are dropped with a warning in the cell."),
)

#: Every setting, by name.
OPTIONS: dict[str, Option] = {o.name: o for o in _ROWS}

#: The settings a kernelspec can bake in, by their option name (kernelspec.install(mem=1024)).
KERNELSPEC_OPTIONS: dict[str, Option] = {o.option: o for o in _ROWS if o.kernelspec}
#: The settings a %smolvm line can name, by their option (--mem).
LINE_OPTIONS: dict[str, Option] = {f"--{o.option}": o for o in _ROWS if o.line}
#: Settings a user may change on a running kernel (panel, %smolvm config), and those of
#: them that need no fresh VM.
USER_SETTINGS: tuple[str, ...] = tuple(o.name for o in _ROWS if o.user)
LIVE_SETTINGS: tuple[str, ...] = tuple(o.name for o in _ROWS if o.live)
#: The settings the instructor's policy caps, with their variables (a set variable is a choice).
CAPPED_ENV: dict[str, str] = {o.name: o.env for o in _ROWS if o.capped and o.env}

#: SMOLVM_* variables that are not settings, and who reads them: they are needed
#: before any SandboxConfig exists (paths, the policy) or are not the user's.
NOT_SETTINGS = {
    "SMOLVM_CACHE_DIR": "paths.py: the image cache's folder",
    "SMOLVM_SNAPSHOT_DIR": "paths.py: the ready snapshots' folder",
    "SMOLVM_STATE_DIR": "paths.py: the registry and the VMs' run folders",
    "SMOLVM_POLICY_FILE": "host/policy.py: another policy file, while /etc/smolvm/policy.toml does not exist",
    "SMOLVM_TIMELINE": "timeline.py: where the kernel process records its start-up timeline",
    "SMOLVM_NOTICE": "remote/launcher.py to jupyter/kernel.py: a placement notice for the user",
}
