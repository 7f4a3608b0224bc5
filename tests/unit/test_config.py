"""SandboxConfig validation, env fallbacks, and errors that name the fix."""

from __future__ import annotations

import pytest

from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.sandbox import Sandbox


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


def test_backend_enum_is_checked():
    with pytest.raises(ConfigError, match="backend"):
        Sandbox(backend="xen")


def test_config_object_plus_overrides():
    base = SandboxConfig(mem_mib=1024, vcpus=1)
    sb = Sandbox(base, vcpus=2)
    assert (sb.config.mem_mib, sb.config.vcpus) == (1024, 2)
