"""Every check of a SandboxConfig's values, in one place.

Two kinds, each message naming the value and the fix:

- one value alone (``check(name, value)``): its range or form. SandboxConfig
  runs it on every assignment (its ``@validate``) and, through
  ``check_values``, on every default, a SMOLVM_* variable included;
- values together (``check_together``): sizes within the host's limits (which
  the instructor's caps may have lowered, see caps.py), settings that only
  work together, and what the instructor's policy refuses.
"""

from __future__ import annotations

import math
import os

from traitlets import TraitError

from smolvm_kernel.config.options import (MAX_DISK_MIB, MAX_MEM_MIB, MAX_VCPUS, MIN_DISK_MIB, MIN_MEM_MIB,
                                          OPTIONS)
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.images.cache import ImageCache, unknown_profile_fix
from smolvm_kernel.images.recipe import PROFILES


def _vcpus(name: str, n: int) -> int:
    cores = os.cpu_count() or 1
    if not 1 <= n <= min(MAX_VCPUS, max(cores, 1) * 4):
        raise TraitError(f"vcpus={n} is out of range; use 1 to {min(MAX_VCPUS, cores * 4)} "
                         f"(this host has {cores} cores)")
    return n


def _mem_mib(name: str, n: int) -> int:
    if not MIN_MEM_MIB <= n <= MAX_MEM_MIB:
        raise TraitError(f"mem_mib={n} is out of range; use {MIN_MEM_MIB} to {MAX_MEM_MIB} "
                         f"(the guest kernel plus ipykernel need about 150 MiB)")
    return n


def _disk_mib(name: str, n: int) -> int:
    if not MIN_DISK_MIB <= n <= MAX_DISK_MIB:
        raise TraitError(f"disk_mib={n} is out of range; use {MIN_DISK_MIB} to {MAX_DISK_MIB}")
    return n


def _profile(name: str, value: str) -> str:
    if value in PROFILES:
        return value
    cache = ImageCache()
    if value not in cache.courses():        # a course image built on this host (or the shared cache)
        raise TraitError(f"profile={value!r} is unknown; {unknown_profile_fix(cache.profiles())}")
    return value


#: seconds setting -> (an example, what 0 means)
_SECONDS = {"boot_timeout": ("90", None), "exec_timeout": ("60 (0 = no limit)", " (0 = no limit)"),
            "pause_after": ("600 (0 = never)", " (0 = never)")}


def _seconds(name: str, value: float) -> float:
    example, zero = _SECONDS[name]
    if not math.isfinite(value):
        raise TraitError(f"{name}={value} is not a number of seconds; give e.g. {example}")
    if value < 0 or (name == "boot_timeout" and value < 5):
        raise TraitError(f"{name}={value} is too small; give seconds{zero or ' (at least 5)'}")
    return value


def _dns(name: str, value: list[str]) -> list[str]:
    import ipaddress

    entries = list(value)
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


def _net_pool(name: str, value: str) -> str:
    import ipaddress

    try:
        net = ipaddress.IPv4Network(value)
    except ValueError:
        raise TraitError(f"net_pool={value!r} is not an IPv4 network; give e.g. '10.213.0.0/16'") from None
    if not net.is_private or net.prefixlen > 30:
        raise TraitError(f"net_pool={value!r} must be a private range of at least a /30, "
                         f"e.g. '10.213.0.0/16'")
    return value


def _egress_allow(name: str, value: list[str]) -> list[str]:
    from smolvm_kernel.host.net import Allow

    for entry in value:
        try:
            Allow.parse(entry)
        except ConfigError as exc:
            raise TraitError(str(exc)) from None
    return value


def _within(low: float, high: float, fix: str = ""):
    def check(name: str, n):
        if not low <= n <= high:
            raise TraitError(f"{name}={n} is out of range; use {low} to {high}{fix}")
        return n
    return check


def _cpu_limit(name: str, n: float) -> float:
    if n != 0 and not 0.05 <= n <= 1024:
        raise TraitError(f"cpu_limit={n} is out of range; use 0 (one core per vCPU) or 0.05 to 1024 cores")
    return n


#: setting -> its check of one value: (name, value) -> the value, or TraitError naming the fix.
CHECKS = {
    "vcpus": _vcpus, "mem_mib": _mem_mib, "disk_mib": _disk_mib, "profile": _profile,
    "boot_timeout": _seconds, "exec_timeout": _seconds, "pause_after": _seconds,
    "dns": _dns, "net_pool": _net_pool, "egress_allow": _egress_allow,
    "net_max_connections": _within(1, 65536), "net_connection_rate": _within(1, 65536),
    "max_transfer_mib": _within(1, 256, " (the guest agent's file limit)"),
    "max_output_mib": _within(1, 4096),
    "vmm_overhead_mib": _within(0, 65536, " (256 suits QEMU)"),
    "cpu_limit": _cpu_limit,
    "checkpoint_each_cell": _within(0, 20, " (undo steps kept; each is a checkpoint on disk)"),
    "max_message_bytes": _within(64 * 1024, 32 * 1024 * 1024, " (the wire protocol's frame limit)"),
}


def check(name: str, value):
    """``value`` if it suits setting ``name``; TraitError naming the value and the fix otherwise."""
    return CHECKS[name](name, value)


def check_values(cfg) -> None:
    """Read every setting of ``cfg`` (a SandboxConfig) and check it alone.

    Traitlets checks assignments, not defaults: a SMOLVM_* variable once
    skipped these checks and SMOLVM_MEM_MIB=1 reached QEMU. Each value is
    assigned again, which runs its check. ConfigError names the value and the fix.
    """
    try:
        for name in cfg.trait_names():
            value = getattr(cfg, name)
            if cfg.trait_metadata(name, "config"):
                setattr(cfg, name, value)
    except TraitError as exc:
        raise ConfigError.from_trait(exc) from None


def limit_problems(cfg, values: dict | None = None) -> list[str]:
    """Why ``values`` (default: the config's own sizes) exceed ``cfg``'s host limits.

    Each entry names the value, the limit and the setting that raises it.
    """
    v = {"vcpus": cfg.vcpus, "mem_mib": cfg.mem_mib, "disk_mib": cfg.disk_mib}
    v.update(values or {})
    problems = []
    for name, unit in (("vcpus", ""), ("mem_mib", " MiB"), ("disk_mib", " MiB")):
        setting = f"max_{name}"
        limit = getattr(cfg, setting)
        if v[name] <= limit:
            continue
        if cfg.policy is not None and getattr(cfg.policy, setting) == limit:
            problems.append(f"{name}={v[name]} is above the cap of {limit}{unit} set by "
                            f"{cfg.policy.whose}; ask for at most {limit}, or ask the instructor")
        else:
            problems.append(f"{name}={v[name]} is above this host's limit of {limit}{unit}; "
                            f"ask for at most {limit} (the host sets SandboxConfig.{setting} "
                            f"or {OPTIONS[setting].env})")
    return problems


def combination_problems(cfg) -> list[str]:
    """Settings of ``cfg`` that are valid alone but not together."""
    if cfg.transport == "ssh" and cfg.network == "none":
        return ["transport='ssh' needs network='nat': SSH reaches the guest over its NIC, and "
                "network='none' gives it none"]
    return []


def check_together(cfg) -> None:
    """ConfigError listing every problem of ``cfg``'s values together: a size above
    a host limit or an instructor's cap, settings at odds, a value the policy refuses."""
    problems = (limit_problems(cfg) + combination_problems(cfg)
                + (cfg.policy.problems(cfg) if cfg.policy else []))
    if problems:
        raise ConfigError("", None, "; ".join(problems))
