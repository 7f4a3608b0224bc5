"""SandboxConfig: every user-tunable value, validated, with SMOLVM_* fallbacks.

Values come, in increasing priority, from the trait defaults, ``SMOLVM_*``
environment variables, a traitlets config file (``jupyter_smolvm_config.py``),
and keyword arguments::

    SandboxConfig(vcpus=2, mem_mib=1024)
"""

from __future__ import annotations

import math
import os

from traitlets import default, validate
from traitlets.config import Configurable
from traitlets.traitlets import TraitError

from smolvm_kernel.config.options import (CAPPED_ENV, IGNORE_ENV, LIVE_SETTINGS, MAX_DISK_MIB, MAX_MEM_MIB,
                                          MAX_VCPUS, MIN_DISK_MIB, MIN_MEM_MIB, OPTIONS, USER_SETTINGS, env)
from smolvm_kernel.images.recipe import PROFILES

__all__ = ["LIVE_SETTINGS", "MAX_DISK_MIB", "MAX_MEM_MIB", "MAX_VCPUS", "MIN_DISK_MIB", "MIN_MEM_MIB",
           "USER_SETTINGS", "SandboxConfig", "load_config"]


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

    # One trait per row of the settings table (options.py), and a @default for
    # each that has a SMOLVM_* variable or a default of the host. A class body's
    # namespace is the dict locals() returns, so they are put there by name.
    for _option in OPTIONS.values():
        locals()[_option.name] = _option.trait()
        if _option.dynamic:
            locals()[f"_{_option.name}_from_env"] = default(_option.name)(
                lambda self, option=_option: option.from_env())
    del _option

    @validate("max_output_mib")
    def _check_max_output(self, proposal):
        n = proposal["value"]
        if not 1 <= n <= 4096:
            raise TraitError(f"max_output_mib={n} is out of range; use 1 to 4096")
        return n

    @validate("vmm_overhead_mib")
    def _check_vmm_overhead(self, proposal):
        n = proposal["value"]
        if not 0 <= n <= 65536:
            raise TraitError(f"vmm_overhead_mib={n} is out of range; use 0 to 65536 (256 suits QEMU)")
        return n

    @validate("cpu_limit")
    def _check_cpu_limit(self, proposal):
        n = proposal["value"]
        if n != 0 and not 0.05 <= n <= 1024:
            raise TraitError(f"cpu_limit={n} is out of range; use 0 (one core per vCPU) or 0.05 to 1024 cores")
        return n

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
                                f"or {OPTIONS[setting].env})")
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
        token = IGNORE_ENV.set(True)
        try:
            cfg = cls()
            for name in cfg.trait_names():
                getattr(cfg, name)
            # A small host's limits may be below the defaults (half of 768 MiB of RAM).
            cfg.vcpus = min(cfg.vcpus, cfg.max_vcpus)
            cfg.mem_mib = min(cfg.mem_mib, cfg.max_mem_mib)
            cfg.disk_mib = min(cfg.disk_mib, cfg.max_disk_mib)
        finally:
            IGNORE_ENV.reset(token)
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

        chosen = {name for name, var in CAPPED_ENV.items() if name in self._given or env(var) is not None}
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
