"""SandboxConfig: every user-tunable value, validated, with SMOLVM_* fallbacks.

Values come, in increasing priority, from the trait defaults, ``SMOLVM_*``
environment variables, a traitlets config file (``jupyter_smolvm_config.py``),
and keyword arguments::

    SandboxConfig(vcpus=2, mem_mib=1024)
"""

from __future__ import annotations

import contextvars
import math
import os
import shutil

from traitlets import Bool, Enum, Float, Int, List, Unicode, default, validate
from traitlets.config import Configurable
from traitlets.traitlets import TraitError

from smolvm_kernel.images.recipe import PROFILES

MAX_VCPUS = 32
MIN_MEM_MIB, MAX_MEM_MIB = 192, 65536
MIN_DISK_MIB, MAX_DISK_MIB = 64, 1024 * 1024


_IGNORE_ENV = contextvars.ContextVar("smolvm_ignore_env", default=False)
#: Settings a user may have chosen (a value set, or its SMOLVM_* variable), which
#: the instructor's policy checks rather than quietly brings within its caps.
_SHAPE_ENV = {"vcpus": "SMOLVM_VCPUS", "mem_mib": "SMOLVM_MEM_MIB", "disk_mib": "SMOLVM_DISK_MIB",
              "exec_timeout": "SMOLVM_TIMEOUT", "max_output_mib": "SMOLVM_MAX_OUTPUT_MIB",
              "output_policy": "SMOLVM_OUTPUT_POLICY", "network": "SMOLVM_NETWORK",
              "profile": "SMOLVM_PROFILE"}


def _env(name: str) -> str | None:
    if _IGNORE_ENV.get():
        return None
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _env_int(name: str, fallback: int) -> int:
    value = _env(name)
    if value is None:
        return fallback
    try:
        return int(value)
    except ValueError:
        raise TraitError(f"{name}={value!r} is not a whole number; unset it or give e.g. {fallback}") from None


def _env_float(name: str, fallback: float) -> float:
    value = _env(name)
    if value is None:
        return fallback
    try:
        return float(value)
    except ValueError:
        raise TraitError(f"{name}={value!r} is not a number; unset it or give e.g. {fallback}") from None


class SandboxConfig(Configurable):
    """Size, image, backend and limits of one microVM."""

    #: The instructor's policy in force (smolvm_kernel.host.policy), read by validated().
    policy = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # What was set, by argument or config file (reading a default counts as
        # setting it for traitlets, so this is recorded now).
        section = self.config.get("SandboxConfig", {}) if self.config else {}
        self._given = {*kwargs, *section}

    vcpus = Int(help="Virtual CPUs of the VM (env SMOLVM_VCPUS).").tag(config=True)
    mem_mib = Int(help="Guest memory in MiB (env SMOLVM_MEM_MIB).").tag(config=True)
    disk_mib = Int(help="Size of the per-VM scratch disk in MiB; sparse, so unused space "
                        "costs nothing (env SMOLVM_DISK_MIB).").tag(config=True)
    profile = Unicode(help="Guest image profile: " + ", ".join(PROFILES) +
                           " (env SMOLVM_PROFILE).").tag(config=True)
    backend = Enum(["auto", "qemu", "firecracker"],
                   help="VMM: auto picks Firecracker where it can run, else QEMU "
                        "(env SMOLVM_BACKEND).").tag(config=True)
    accel = Enum(["auto", "kvm", "hvf", "tcg"],
                 help="Accelerator: auto probes KVM by booting a tiny guest and falls back "
                      "to TCG (env SMOLVM_ACCEL).").tag(config=True)
    boot_timeout = Float(help="Seconds to wait for the guest kernel to answer after launch "
                              "(env SMOLVM_BOOT_TIMEOUT).").tag(config=True)
    exec_timeout = Float(help="Default per-execution wall-clock limit in seconds; 0 means "
                              "none (env SMOLVM_TIMEOUT).").tag(config=True)
    pause_after = Float(help="Seconds a VM may sit idle (no cell running, no message either way) "
                             "before it is paused to disk, its host memory freed; its next use "
                             "resumes it, state intact. 0 = never (env SMOLVM_PAUSE_AFTER). VMs "
                             "with a network are not paused.").tag(config=True)
    network = Enum(["none", "nat"],
                   help="Guest networking: none (the default: no NIC at all) or nat (one TAP, NAT "
                        "egress through nftables, no VM-to-VM, no host, no 169.254/16; needs "
                        "CAP_NET_ADMIN) (env SMOLVM_NETWORK).").tag(config=True)
    transport = Enum(["auto", "serial", "vsock", "ssh"],
                     help="How the host reaches the guest agent: auto = vsock where the backend "
                          "has it, else virtio-serial (QEMU); ssh = paramiko over the VM's NIC with "
                          "pinned keys (needs network='nat') (env SMOLVM_TRANSPORT).").tag(config=True)
    netns = Unicode(help="Put the VM's TAP, rules and NAT in this named network namespace "
                         "(/run/netns/NAME) instead of the host's (env SMOLVM_NETNS).").tag(config=True)
    net_pool = Unicode("10.213.0.0/16",
                       help="Private IPv4 pool the VMs' /30 links are leased from; leases never "
                            "overlap a route of the namespace.").tag(config=True)
    egress_allow = List(Unicode(), help="With network='nat': if set, the VM may reach only these "
                                        "('CIDR' or 'CIDR:port,port'); otherwise any address but the "
                                        "always-blocked ones.").tag(config=True)
    net_max_connections = Int(512, help="With network='nat': most connections (TCP, UDP flows) the VM "
                                        "may have open through the host at once; more are dropped."
                               ).tag(config=True)
    net_connection_rate = Int(100, help="With network='nat': most new connections a second the VM may "
                                        "open through the host (bursts up to as many); more are dropped."
                              ).tag(config=True)
    dns = List(Unicode(), help="Name servers written into a networked guest's resolv.conf: IPv4 "
                               "addresses, or 'host' (the host's own non-loopback name servers at VM "
                               "start); [] or ['none'] = no DNS (names resolve only from the guest's "
                               "/etc/hosts). With egress_allow, a server is used only if the allowlist "
                               "lets port 53 through (env SMOLVM_DNS: 'host', 'none' or "
                               "'1.1.1.1,9.9.9.9'; default 'host').").tag(config=True)
    qemu_path = Unicode(help="The qemu-system binary (env SMOLVM_QEMU).").tag(config=True)
    firecracker_path = Unicode(help="The firecracker binary (env SMOLVM_FIRECRACKER).").tag(config=True)
    auto_build = Bool(help="Build the guest image on first use if it is missing "
                           "(env SMOLVM_AUTO_BUILD=1).").tag(config=True)
    debug_console = Bool(help="Verbose guest kernel console (loglevel=7) for boot "
                              "debugging (env SMOLVM_DEBUG_CONSOLE=1).").tag(config=True)
    snapshot = Enum(["auto", "wait", "off"],
                    help="Start and reset from a ready snapshot of this VM shape, restored in "
                         "under a second. auto: a shape without one cold-boots at once and its "
                         "snapshot is built in the background for the next start; wait: build it "
                         "first, then restore; off: always cold boot (env SMOLVM_SNAPSHOT).").tag(config=True)
    on_stopped = Enum(["start", "error"],
                      help="After the VM is torn down (panel Teardown, %smolvm stop): start a "
                           "fresh one for the next cell, or answer it with an error that says "
                           "how to start one (env SMOLVM_ON_STOPPED).").tag(config=True)
    output_policy = Enum(["safe", "trusted"],
                         help="What of the VM's output a frontend may render: safe (the default: "
                              "scripts, JavaScript outputs, event handlers, unknown widget modules "
                              "and %smolvm lines in payloads are blocked, HTML/SVG/Markdown "
                              "sanitised; see smolvm_kernel/output_policy.py) or trusted (everything "
                              "passes, and guest code can run JavaScript in your browser with your "
                              "Jupyter session: only for code you trust) (env "
                              "SMOLVM_OUTPUT_POLICY).").tag(config=True)
    output_allow_mimes = List(Unicode(), help="Mime types to let through under the safe policy "
                                              "besides the built-in safe ones, e.g. "
                                              "['application/vnd.plotly.v1+json'] (their renderer "
                                              "runs in your browser).").tag(config=True)
    widget_modules = List(Unicode(), ["@jupyter-widgets/base", "@jupyter-widgets/controls",
                                      "@jupyter-widgets/output"],
                          help="Widget model/view modules the VM's widgets may use under the safe "
                               "policy (a frontend loads the module's code).").tag(config=True)
    # The host's limits: what a user may ask for from the panel, %smolvm
    # config or a kernelspec. Set by whoever runs the host.
    max_vcpus = Int(help="Most vCPUs one VM may have (env SMOLVM_MAX_VCPUS; default: the "
                         "host's cores).").tag(config=True)
    max_mem_mib = Int(help="Most guest memory one VM may have, in MiB (env SMOLVM_MAX_MEM_MIB; "
                           "default: half the host's memory).").tag(config=True)
    max_disk_mib = Int(help="Largest scratch disk one VM may have, in MiB "
                            "(env SMOLVM_MAX_DISK_MIB).").tag(config=True)
    max_transfer_mib = Int(64, help="Largest file %smolvm push/pull moves, in MiB "
                                    "(at most 256).").tag(config=True)
    max_output_mib = Int(help="Most output one cell may send to the frontend, in MiB (streams, "
                              "displays, results); beyond it the rest is dropped and the cell says "
                              "how much (env SMOLVM_MAX_OUTPUT_MIB; default 16).").tag(config=True)
    vmm_overhead_mib = Int(help="Host memory the VMM process may use beyond the guest's RAM, in MiB "
                                "(its cgroup's memory limit is mem_mib plus this; QEMU under TCG "
                                "needs about 130; env SMOLVM_VMM_OVERHEAD_MIB; default 256).").tag(config=True)
    cpu_limit = Float(help="Host CPU the VMM may use, in cores (its cgroup's CPU quota; "
                           "env SMOLVM_CPU_LIMIT; default 0: one core per vCPU).").tag(config=True)
    max_message_bytes = Int(32 * 1024 * 1024,
                            help="Largest message accepted from the guest; larger ones are "
                                 "dropped with a warning in the cell.").tag(config=True)

    @default("vcpus")
    def _vcpus_default(self) -> int:
        return _env_int("SMOLVM_VCPUS", 2)

    @default("mem_mib")
    def _mem_default(self) -> int:
        return _env_int("SMOLVM_MEM_MIB", 512)

    @default("disk_mib")
    def _disk_default(self) -> int:
        return _env_int("SMOLVM_DISK_MIB", 2048)

    @default("profile")
    def _profile_default(self) -> str:
        return _env("SMOLVM_PROFILE") or "base"

    @default("backend")
    def _backend_default(self) -> str:
        return _env("SMOLVM_BACKEND") or "auto"

    @default("accel")
    def _accel_default(self) -> str:
        return _env("SMOLVM_ACCEL") or "auto"

    @default("boot_timeout")
    def _boot_timeout_default(self) -> float:
        # A cold TCG boot reaches a ready ipykernel in 8-13 s on 2 cores;
        # leave room for a loaded CI host.
        return _env_float("SMOLVM_BOOT_TIMEOUT", 90.0)

    @default("exec_timeout")
    def _exec_timeout_default(self) -> float:
        return _env_float("SMOLVM_TIMEOUT", 0.0)

    @default("pause_after")
    def _pause_after_default(self) -> float:
        return _env_float("SMOLVM_PAUSE_AFTER", 0.0)

    @default("snapshot")
    def _snapshot_default(self) -> str:
        return _env("SMOLVM_SNAPSHOT") or "auto"

    @default("qemu_path")
    def _qemu_default(self) -> str:
        return _env("SMOLVM_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"

    @default("firecracker_path")
    def _fc_default(self) -> str:
        return _env("SMOLVM_FIRECRACKER") or shutil.which("firecracker") or "firecracker"

    @default("auto_build")
    def _auto_build_default(self) -> bool:
        return _env("SMOLVM_AUTO_BUILD") in ("1", "true", "yes")

    @default("debug_console")
    def _debug_console_default(self) -> bool:
        return _env("SMOLVM_DEBUG_CONSOLE") in ("1", "true", "yes")

    @default("max_output_mib")
    def _max_output_default(self) -> int:
        return _env_int("SMOLVM_MAX_OUTPUT_MIB", 16)

    @validate("max_output_mib")
    def _check_max_output(self, proposal):
        n = proposal["value"]
        if not 1 <= n <= 4096:
            raise TraitError(f"max_output_mib={n} is out of range; use 1 to 4096")
        return n

    @default("vmm_overhead_mib")
    def _vmm_overhead_default(self) -> int:
        return _env_int("SMOLVM_VMM_OVERHEAD_MIB", 256)

    @validate("vmm_overhead_mib")
    def _check_vmm_overhead(self, proposal):
        n = proposal["value"]
        if not 0 <= n <= 65536:
            raise TraitError(f"vmm_overhead_mib={n} is out of range; use 0 to 65536 (256 suits QEMU)")
        return n

    @default("cpu_limit")
    def _cpu_limit_default(self) -> float:
        return _env_float("SMOLVM_CPU_LIMIT", 0.0)

    @validate("cpu_limit")
    def _check_cpu_limit(self, proposal):
        n = proposal["value"]
        if n != 0 and not 0.05 <= n <= 1024:
            raise TraitError(f"cpu_limit={n} is out of range; use 0 (one core per vCPU) or 0.05 to 1024 cores")
        return n

    @default("output_policy")
    def _output_policy_default(self) -> str:
        return _env("SMOLVM_OUTPUT_POLICY") or "safe"

    @default("on_stopped")
    def _on_stopped_default(self) -> str:
        return _env("SMOLVM_ON_STOPPED") or "start"

    @default("max_vcpus")
    def _max_vcpus_default(self) -> int:
        return _env_int("SMOLVM_MAX_VCPUS", min(MAX_VCPUS, max(2, os.cpu_count() or 1)))

    @default("max_mem_mib")
    def _max_mem_default(self) -> int:
        return _env_int("SMOLVM_MAX_MEM_MIB", max(MIN_MEM_MIB, min(MAX_MEM_MIB, _host_mem_mib() // 2)))

    @default("max_disk_mib")
    def _max_disk_default(self) -> int:
        return _env_int("SMOLVM_MAX_DISK_MIB", 16384)

    @default("network")
    def _network_default(self) -> str:
        return _env("SMOLVM_NETWORK") or "none"

    @default("transport")
    def _transport_default(self) -> str:
        return _env("SMOLVM_TRANSPORT") or "auto"

    @default("netns")
    def _netns_default(self) -> str:
        return _env("SMOLVM_NETNS") or ""

    @default("dns")
    def _dns_default(self) -> list[str]:
        value = _env("SMOLVM_DNS")
        return [v.strip() for v in value.split(",") if v.strip()] if value else ["host"]

    @validate("dns")
    def _check_dns(self, proposal):
        import ipaddress

        entries = list(proposal["value"])
        for entry in entries:
            if entry in ("host", "none"):
                continue
            try:
                ipaddress.IPv4Address(entry)
            except ValueError:
                raise TraitError(f"dns entry {entry!r} is neither an IPv4 address nor 'host' or 'none'; "
                                 f"give e.g. ['host'], ['192.0.2.53'] or ['none']") from None
        if "none" in entries and len(entries) > 1:
            raise TraitError(f"dns={entries!r} mixes 'none' with name servers; give ['none'] alone")
        return entries

    @validate("net_pool")
    def _check_pool(self, proposal):
        import ipaddress

        value = proposal["value"]
        try:
            net = ipaddress.IPv4Network(value)
        except ValueError:
            raise TraitError(f"net_pool={value!r} is not an IPv4 network; give e.g. '10.213.0.0/16'") from None
        if not net.is_private or net.prefixlen > 30:
            raise TraitError(f"net_pool={value!r} must be a private range of at least a /30, "
                             f"e.g. '10.213.0.0/16'")
        return value

    @validate("egress_allow")
    def _check_allow(self, proposal):
        from smolvm_kernel.errors import ConfigError
        from smolvm_kernel.host.net import Allow

        for entry in proposal["value"]:
            try:
                Allow.parse(entry)
            except ConfigError as exc:
                raise TraitError(str(exc)) from None
        return proposal["value"]

    def combination_problems(self) -> list[str]:
        """Settings that are valid alone but not together."""
        if self.transport == "ssh" and self.network == "none":
            return ["transport='ssh' needs network='nat': SSH reaches the guest over its NIC, and "
                    "network='none' gives it none"]
        return []

    @validate("net_max_connections", "net_connection_rate")
    def _check_net_limits(self, proposal):
        n, name = proposal["value"], proposal["trait"].name
        if not 1 <= n <= 65536:
            raise TraitError(f"{name}={n} is out of range; use 1 to 65536")
        return n

    @validate("max_transfer_mib")
    def _check_transfer(self, proposal):
        n = proposal["value"]
        if not 1 <= n <= 256:
            raise TraitError(f"max_transfer_mib={n} is out of range; use 1 to 256 "
                             f"(the guest agent's file limit)")
        return n

    def limit_problems(self, values: dict | None = None) -> list[str]:
        """Why ``values`` (default: this config's own) exceed the host's limits.

        Each entry names the value, the limit and the setting that raises it.
        """
        v = {"vcpus": self.vcpus, "mem_mib": self.mem_mib, "disk_mib": self.disk_mib}
        v.update(values or {})
        problems = []
        for name, limit, setting, unit in (("vcpus", self.max_vcpus, "max_vcpus", ""),
                                           ("mem_mib", self.max_mem_mib, "max_mem_mib", " MiB"),
                                           ("disk_mib", self.max_disk_mib, "max_disk_mib", " MiB")):
            if v[name] <= limit:
                continue
            if self.policy is not None and getattr(self.policy, setting) == limit:
                problems.append(f"{name}={v[name]} is above the cap of {limit}{unit} set by "
                                f"{self.policy.whose}; ask for at most {limit}, or ask the instructor")
            else:
                problems.append(f"{name}={v[name]} is above this host's limit of {limit}{unit}; "
                                f"ask for at most {limit} (the host sets SandboxConfig.{setting} "
                                f"or SMOLVM_{setting.upper()})")
        return problems

    def _apply_caps(self, pol, chosen: set[str]) -> None:
        """The policy's size caps become this config's host limits (a user's own
        max_* cannot raise them); a size or timeout the user did not choose is
        brought within them, one they chose is checked (validated says why)."""
        for name in ("vcpus", "mem_mib", "disk_mib"):
            cap = getattr(pol, f"max_{name}")
            if cap is not None and getattr(self, f"max_{name}") > cap:
                setattr(self, f"max_{name}", cap)
            if name not in chosen:
                setattr(self, name, min(getattr(self, name), getattr(self, f"max_{name}")))
        if pol.max_exec_timeout and "exec_timeout" not in chosen and not 0 < self.exec_timeout <= pol.max_exec_timeout:
            self.exec_timeout = float(pol.max_exec_timeout)
        if pol.max_output_mib is not None and "max_output_mib" not in chosen:
            self.max_output_mib = min(self.max_output_mib, pol.max_output_mib)
        if pol.pause_after and not 0 < self.pause_after <= pol.pause_after:
            # Not a user's right but the host's memory: brought within, not refused.
            self.pause_after = float(pol.pause_after)
        if pol.output_policy is not None and "output_policy" not in chosen:
            self.output_policy = pol.output_policy
        if pol.network is not None and "network" not in chosen and self.network not in pol.network:
            self.network = pol.network[0]
        if pol.profiles is not None and "profile" not in chosen and self.profile not in pol.profiles:
            self.profile = pol.profiles[0]

    @classmethod
    def builtin(cls) -> SandboxConfig:
        """The built-in defaults alone: no config file, no SMOLVM_* variable
        (what a kernel runs on while it reports that those are wrong)."""
        token = _IGNORE_ENV.set(True)
        try:
            cfg = cls()
            for name in cfg.trait_names():
                getattr(cfg, name)
            # A small host's limits may be below the defaults (half of 768 MiB of RAM).
            cfg.vcpus = min(cfg.vcpus, cfg.max_vcpus)
            cfg.mem_mib = min(cfg.mem_mib, cfg.max_mem_mib)
            cfg.disk_mib = min(cfg.disk_mib, cfg.max_disk_mib)
        finally:
            _IGNORE_ENV.reset(token)
        from smolvm_kernel.errors import ConfigError
        from smolvm_kernel.host import policy

        try:
            cfg.policy = policy.load()
        except ConfigError:      # the kernel reports it, and starts no VM meanwhile
            cfg.policy = None
        if cfg.policy is not None:
            cfg._apply_caps(cfg.policy, set())
        return cfg

    def changed(self, **changes) -> SandboxConfig:
        """A copy with ``changes`` applied, validated against ranges and host limits.

        Raises ConfigError naming the value and the fix; this config is untouched.
        """
        from smolvm_kernel.errors import ConfigError

        values = {name: getattr(self, name) for name in self.trait_names()
                  if self.trait_metadata(name, "config")}
        values.update(changes)
        try:
            new = SandboxConfig(**values)
        except TraitError as exc:
            raise ConfigError.from_trait(exc) from None
        return new.validated()

    def validated(self) -> SandboxConfig:
        """This config, with every lazy default read (env fallbacks included).

        Raises ConfigError naming the value and the fix when a value is out of
        range, above a host limit, or at odds with another setting.
        """
        from smolvm_kernel.errors import ConfigError
        from smolvm_kernel.host import policy

        chosen = {name for name, env in _SHAPE_ENV.items() if name in self._given or _env(env) is not None}
        try:
            for name in self.trait_names():
                value = getattr(self, name)
                if self.trait_metadata(name, "config"):
                    # A default (a SMOLVM_* variable included) skips the range
                    # checks an assignment runs: run them now.
                    setattr(self, name, value)
        except TraitError as exc:
            raise ConfigError.from_trait(exc) from None
        self.policy = policy.load()
        if self.policy is not None:
            self._apply_caps(self.policy, chosen)
        problems = (self.limit_problems() + self.combination_problems()
                    + (self.policy.problems(self) if self.policy else []))
        if problems:
            raise ConfigError("", None, "; ".join(problems))
        return self

    @validate("vcpus")
    def _check_vcpus(self, proposal):
        n = proposal["value"]
        cores = os.cpu_count() or 1
        if not 1 <= n <= min(MAX_VCPUS, max(cores, 1) * 4):
            raise TraitError(f"vcpus={n} is out of range; use 1 to {min(MAX_VCPUS, cores * 4)} "
                             f"(this host has {cores} cores)")
        return n

    @validate("mem_mib")
    def _check_mem(self, proposal):
        n = proposal["value"]
        if not MIN_MEM_MIB <= n <= MAX_MEM_MIB:
            raise TraitError(f"mem_mib={n} is out of range; use {MIN_MEM_MIB} to {MAX_MEM_MIB} "
                             f"(the guest kernel plus ipykernel need about 150 MiB)")
        return n

    @validate("disk_mib")
    def _check_disk(self, proposal):
        n = proposal["value"]
        if not MIN_DISK_MIB <= n <= MAX_DISK_MIB:
            raise TraitError(f"disk_mib={n} is out of range; use {MIN_DISK_MIB} to {MAX_DISK_MIB}")
        return n

    @validate("profile")
    def _check_profile(self, proposal):
        name = proposal["value"]
        if name not in PROFILES:
            raise TraitError(f"profile={name!r} is unknown; choose one of {', '.join(PROFILES)}")
        return name

    @validate("boot_timeout", "exec_timeout", "pause_after")
    def _check_timeout(self, proposal):
        value = proposal["value"]
        name = proposal["trait"].name
        if not math.isfinite(value):
            raise TraitError(f"{name}={value} is not a number of seconds; give e.g. "
                             f"{'90' if name == 'boot_timeout' else '600 (0 = never)' if name == 'pause_after' else '60 (0 = no limit)'}")
        if value < 0 or (name == "boot_timeout" and value < 5):
            raise TraitError(f"{name}={value} is too small; give seconds"
                             f"{' (at least 5)' if name == 'boot_timeout' else ' (0 = never)' if name == 'pause_after' else ' (0 = no limit)'}")
        return value

    @validate("max_message_bytes")
    def _check_max_msg(self, proposal):
        value = proposal["value"]
        if not 64 * 1024 <= value <= 32 * 1024 * 1024:
            raise TraitError(f"max_message_bytes={value} is out of range; use 65536 to 33554432 "
                             f"(the wire protocol's frame limit)")
        return value


def _host_mem_mib() -> int:
    from smolvm_kernel.host.procs import meminfo_mib

    return meminfo_mib("MemTotal", 4096)


#: Settings a user may change on a running kernel (panel, %smolvm config).
#: All but exec_timeout and on_stopped need a fresh VM.
USER_SETTINGS = ("vcpus", "mem_mib", "disk_mib", "exec_timeout", "network")
LIVE_SETTINGS = ("exec_timeout",)


def load_config():
    """Read ``jupyter_smolvm_config.py`` / ``.json`` from the Jupyter config path.

    The result is a traitlets ``SandboxConfig`` whose values come from those
    files (section ``c.SandboxConfig``), then SMOLVM_* variables, then defaults,
    validated (ConfigError names a wrong value and the fix).
    """
    from jupyter_core.paths import jupyter_config_path
    from traitlets.config.loader import Config, JSONFileConfigLoader, PyFileConfigLoader

    merged = Config()
    # jupyter_config_path() lists the highest priority first; load lowest first.
    for directory in reversed(jupyter_config_path()):
        for loader_cls, name in ((JSONFileConfigLoader, "jupyter_smolvm_config.json"),
                                 (PyFileConfigLoader, "jupyter_smolvm_config.py")):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                try:
                    merged.merge(loader_cls(name, path=directory).load_config())
                except Exception as exc:   # a syntax error, bad JSON, an exception in the file
                    from smolvm_kernel.errors import ConfigError
                    raise ConfigError("", None, f"{path} cannot be read: {type(exc).__name__}: {exc}") from None
    try:
        cfg = SandboxConfig(config=merged)
    except TraitError as exc:
        from smolvm_kernel.errors import ConfigError
        raise ConfigError.from_trait(exc) from None
    return cfg.validated()
