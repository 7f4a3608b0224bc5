"""The settings table (smolvm_kernel/config/options.py) is the one source of every
setting's variable, kernelspec option and %smolvm option; the instructor's caps
are applied by a step of their own, apart from the checks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from smolvm_kernel.config import SandboxConfig, checks
from smolvm_kernel.config.options import (CAPPED_ENV, KERNELSPEC_OPTIONS, LINE_OPTIONS, NOT_SETTINGS,
                                          OPTIONS, USER_SETTINGS)
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.host.policy import Policy
from smolvm_kernel.jupyter import hostline, kernelspec

PACKAGE = Path(__file__).resolve().parents[2] / "smolvm_kernel"
TABLE_ENV = {row.env for row in OPTIONS.values() if row.env}


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.read_text(encoding="utf-8")


def _environ_reads(tree: ast.AST):
    """The constant names read through os.environ (get, [], pop) or os.getenv."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            if isinstance(f, ast.Attribute) and (
                    f.attr == "getenv" or f.attr in ("get", "pop") and ast.unparse(f.value).endswith("environ")):
                yield node.args[0].value
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and ast.unparse(node.value).endswith("environ") and isinstance(node.slice, ast.Constant)):
            yield node.slice.value


def test_every_smolvm_variable_the_code_names_is_a_setting_or_listed_as_not_one():
    unknown = {}
    for path, text in _sources():
        for name in re.findall(r"\bSMOLVM_[A-Z0-9_]*[A-Z0-9]\b", text):
            if name not in TABLE_ENV and name not in NOT_SETTINGS:
                unknown.setdefault(name, path.relative_to(PACKAGE.parent).as_posix())
    assert unknown == {}, "add a row to config/options.py, or the name to NOT_SETTINGS with who reads it"
    assert TABLE_ENV.isdisjoint(NOT_SETTINGS)


def test_only_the_table_reads_a_settings_variable():
    """A setting's variable read anywhere but through the table would be a second
    default, unchecked; the variables read directly are the ones that are not settings."""
    direct = {}
    for path, text in _sources():
        for name in _environ_reads(ast.parse(text)):
            if isinstance(name, str) and name.startswith("SMOLVM_"):
                direct.setdefault(name, path.relative_to(PACKAGE.parent).as_posix())
    assert {k: v for k, v in direct.items() if k not in NOT_SETTINGS} == {}
    # and no stale entry: each is read (or set for a child) somewhere
    named = {n for _, text in _sources() for n in re.findall(r"\bSMOLVM_[A-Z0-9_]+", text)}
    assert set(NOT_SETTINGS) <= named


def test_the_variables_keep_their_names():
    """kernel.json files in the wild, the README and hosts' environments name them."""
    assert {row.name: row.env for row in OPTIONS.values() if row.env} == {
        "vcpus": "SMOLVM_VCPUS", "mem_mib": "SMOLVM_MEM_MIB", "disk_mib": "SMOLVM_DISK_MIB",
        "profile": "SMOLVM_PROFILE", "backend": "SMOLVM_BACKEND", "accel": "SMOLVM_ACCEL",
        "boot_timeout": "SMOLVM_BOOT_TIMEOUT", "exec_timeout": "SMOLVM_TIMEOUT",
        "pause_after": "SMOLVM_PAUSE_AFTER", "workdir": "SMOLVM_WORKDIR",
        "workdir_mode": "SMOLVM_WORKDIR_MODE", "network": "SMOLVM_NETWORK", "transport": "SMOLVM_TRANSPORT",
        "netns": "SMOLVM_NETNS", "dns": "SMOLVM_DNS", "qemu_path": "SMOLVM_QEMU",
        "firecracker_path": "SMOLVM_FIRECRACKER", "auto_build": "SMOLVM_AUTO_BUILD",
        "debug_console": "SMOLVM_DEBUG_CONSOLE", "snapshot": "SMOLVM_SNAPSHOT",
        "on_stopped": "SMOLVM_ON_STOPPED", "output_policy": "SMOLVM_OUTPUT_POLICY",
        "max_vcpus": "SMOLVM_MAX_VCPUS", "max_mem_mib": "SMOLVM_MAX_MEM_MIB",
        "max_disk_mib": "SMOLVM_MAX_DISK_MIB", "max_output_mib": "SMOLVM_MAX_OUTPUT_MIB",
        "vmm_overhead_mib": "SMOLVM_VMM_OVERHEAD_MIB", "cpu_limit": "SMOLVM_CPU_LIMIT",
        "checkpoint_each_cell": "SMOLVM_CHECKPOINT_EACH_CELL"}


def test_kernelspec_options_come_from_the_table():
    assert kernelspec.OPTION_ENV == {option: row.env for option, row in KERNELSPEC_OPTIONS.items()}
    assert kernelspec.OPTION_ENV == {
        "profile": "SMOLVM_PROFILE", "mem": "SMOLVM_MEM_MIB", "cpus": "SMOLVM_VCPUS",
        "timeout": "SMOLVM_TIMEOUT", "backend": "SMOLVM_BACKEND", "disk": "SMOLVM_DISK_MIB",
        "network": "SMOLVM_NETWORK", "transport": "SMOLVM_TRANSPORT", "netns": "SMOLVM_NETNS",
        "output_policy": "SMOLVM_OUTPUT_POLICY", "workdir": "SMOLVM_WORKDIR_MODE",
        "undo": "SMOLVM_CHECKPOINT_EACH_CELL"}


def test_line_options_come_from_the_table():
    assert hostline.SETTINGS == {option: (row.name, row.python_type) for option, row in LINE_OPTIONS.items()}
    assert hostline.SETTINGS == {
        "--cpus": ("vcpus", int), "--mem": ("mem_mib", int), "--disk": ("disk_mib", int),
        "--timeout": ("exec_timeout", float), "--network": ("network", str), "--profile": ("profile", str),
        "--workdir": ("workdir_mode", str), "--undo": ("checkpoint_each_cell", int)}
    assert hostline.CONFIG_SETTINGS == USER_SETTINGS == ("vcpus", "mem_mib", "disk_mib", "exec_timeout",
                                                         "checkpoint_each_cell", "network", "workdir_mode")
    assert hostline.COMMANDS["config"][0] == ("[--cpus N] [--mem MiB] [--disk MiB] [--timeout S] [--undo N] "
                                              "[--network none|nat] [--workdir read-write|read-only|off]")


def test_the_table_and_the_class_agree():
    assert set(SandboxConfig.class_trait_names(config=True)) == set(OPTIONS)
    assert set(checks.CHECKS) <= set(OPTIONS)
    assert set(CAPPED_ENV) == {row.name for row in OPTIONS.values() if row.capped}, "a capped setting needs a variable"
    for row in OPTIONS.values():
        assert (row.option is not None) == (row.kernelspec or row.line), row.name
        if row.env:
            assert row.env in SandboxConfig.class_traits()[row.name].help, row.name


def test_applying_the_caps_checks_nothing_and_the_checks_apply_nothing():
    pol = Policy("/etc/smolvm/policy.toml", max_vcpus=1, network=("none",))
    cfg = SandboxConfig(vcpus=2, network="nat").apply_policy(pol, chosen={"vcpus", "network"})
    assert (cfg.vcpus, cfg.max_vcpus, cfg.network, cfg.policy) == (2, 1, "nat", pol)   # chosen: left as they are
    with pytest.raises(ConfigError) as info:
        checks.check_together(cfg)
    assert "vcpus=2 is above the cap of 1" in str(info.value) and "network='nat' is not allowed" in str(info.value)
    assert (cfg.vcpus, cfg.network) == (2, "nat")
    quiet = SandboxConfig(vcpus=2, network="nat").apply_policy(pol)       # not chosen: brought within
    assert (quiet.vcpus, quiet.network) == (1, "none")
    checks.check_together(quiet)
