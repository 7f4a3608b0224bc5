"""SandboxConfig validation, env fallbacks, and errors that name the fix."""

from __future__ import annotations

import pytest

from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.vm.sandbox import Sandbox


def test_defaults():
    cfg = SandboxConfig()
    assert cfg.vcpus >= 1 and cfg.mem_mib >= 192 and cfg.profile == "base"
    assert cfg.network == "none"


def test_env_fallbacks(monkeypatch):
    monkeypatch.setenv("SMOLVM_VCPUS", "1")
    monkeypatch.setenv("SMOLVM_MEM_MIB", "768")
    monkeypatch.setenv("SMOLVM_PROFILE", "scipy")
    cfg = SandboxConfig()
    assert (cfg.vcpus, cfg.mem_mib, cfg.profile) == (1, 768, "scipy")
    assert SandboxConfig(vcpus=2).vcpus == 2   # explicit beats env


@pytest.mark.parametrize("kwargs, words", [
    ({"mem_mib": 10}, ["mem_mib=10", "192"]),
    ({"vcpus": 0}, ["vcpus=0", "use 1 to"]),
    ({"profile": "nope"}, ["profile='nope'", "base"]),
    ({"boot_timeout": 1}, ["boot_timeout", "at least 5"]),
    ({"disk_mib": 1}, ["disk_mib=1"]),
    ({"exec_timeout": -1}, ["exec_timeout"]),
])
def test_bad_values_name_the_value_and_the_fix(kwargs, words):
    with pytest.raises(ConfigError) as info:
        Sandbox(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_env_value_is_reported(monkeypatch):
    monkeypatch.setenv("SMOLVM_MEM_MIB", "lots")
    with pytest.raises(ConfigError, match="SMOLVM_MEM_MIB='lots'"):
        Sandbox()


@pytest.mark.parametrize("var, value, words", [
    ("SMOLVM_MEM_MIB", "1", ["mem_mib=1", "192"]),
    ("SMOLVM_VCPUS", "999", ["vcpus=999", "use 1 to"]),
    ("SMOLVM_BOOT_TIMEOUT", "nan", ["boot_timeout=nan", "not a number of seconds"]),
    ("SMOLVM_TIMEOUT", "inf", ["exec_timeout=inf"]),
])
def test_env_values_get_the_same_range_checks(monkeypatch, var, value, words):
    # Traitlets validates assignments, not defaults: an env fallback once
    # skipped these checks and SMOLVM_MEM_MIB=1 reached QEMU.
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        Sandbox()
    for word in words:
        assert word in str(info.value)


def test_builtin_ignores_the_environment(monkeypatch):
    monkeypatch.setenv("SMOLVM_MEM_MIB", "1")
    monkeypatch.setenv("SMOLVM_VCPUS", "two")
    cfg = SandboxConfig.builtin()
    assert (cfg.mem_mib, cfg.vcpus) == (512, 2)
    assert SandboxConfig(mem_mib=cfg.mem_mib, vcpus=cfg.vcpus).validated()
    monkeypatch.setenv("SMOLVM_MAX_MEM_MIB", "300")   # ignored too: the host's own limit applies
    assert SandboxConfig.builtin().mem_mib == min(512, SandboxConfig.builtin().max_mem_mib)


def test_a_broken_config_file_is_named(tmp_path, monkeypatch):
    from smolvm_kernel.config import load_config

    (tmp_path / "jupyter_smolvm_config.py").write_text("c.SandboxConfig.mem_mib = (\n")
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="jupyter_smolvm_config.py cannot be read: SyntaxError"):
        load_config()


def test_backend_enum_is_checked():
    with pytest.raises(ConfigError, match="backend"):
        Sandbox(backend="xen")


def test_config_object_plus_overrides():
    base = SandboxConfig(mem_mib=1024, vcpus=1)
    sb = Sandbox(base, vcpus=2)
    assert (sb.config.mem_mib, sb.config.vcpus) == (1024, 2)
