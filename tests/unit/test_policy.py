"""The instructor's policy: caps users cannot raise, from a root-owned file."""

from __future__ import annotations

import os

import pytest

from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.host import policy

POLICY = """
max_vcpus = 1
max_mem_mib = 768
max_exec_timeout = 60
network = ["none"]
profiles = ["base"]
output_policy = "safe"
max_output_mib = 8
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the policy file must be root's: run as root")


@pytest.fixture
def with_policy(tmp_path, monkeypatch):
    """A policy through SMOLVM_POLICY_FILE (no /etc/smolvm/policy.toml here)."""
    monkeypatch.setattr(policy, "POLICY_FILE", str(tmp_path / "etc-smolvm-policy.toml"))
    for var in ("SMOLVM_VCPUS", "SMOLVM_MEM_MIB", "SMOLVM_NETWORK", "SMOLVM_TIMEOUT", "SMOLVM_OUTPUT_POLICY"):
        monkeypatch.delenv(var, raising=False)

    def write(text: str = POLICY) -> str:
        path = tmp_path / "policy.toml"
        path.write_text(text)
        path.chmod(0o644)
        monkeypatch.setenv("SMOLVM_POLICY_FILE", str(path))
        return str(path)
    return write


@needs_root
def test_unchosen_settings_come_within_the_caps(with_policy):
    path = with_policy()
    cfg = SandboxConfig().validated()
    assert (cfg.vcpus, cfg.max_vcpus, cfg.mem_mib, cfg.max_mem_mib) == (1, 1, 512, 768)
    assert cfg.exec_timeout == 60 and cfg.max_output_mib == 8 and cfg.policy.path == path


@needs_root
@pytest.mark.parametrize("values, words", [
    ({"vcpus": 2}, "vcpus=2 is above the cap of 1 set by the instructor's policy"),
    ({"vcpus": 1, "max_vcpus": 64, "mem_mib": 1024}, "mem_mib=1024 is above the cap of 768 MiB"),
    ({"network": "nat"}, "network='nat' is not allowed by the instructor's policy"),
    ({"profile": "scipy"}, "profile='scipy' is not allowed"),
    ({"output_policy": "trusted"}, "output_policy='trusted': the instructor's policy"),
    ({"exec_timeout": 0}, "asks for no timeout; the instructor's policy"),
    ({"exec_timeout": 600}, "allows at most 60 s per cell"),
    ({"max_output_mib": 64}, "max_output_mib=64 is above the cap of 8 set by the instructor's policy"),
])
def test_a_users_value_beyond_a_cap_is_refused_with_whose_cap_it_is(with_policy, values, words):
    with_policy()
    with pytest.raises(ConfigError, match="ask the instructor") as info:
        SandboxConfig(**values).validated()
    assert words in str(info.value)


@needs_root
def test_a_users_own_limits_and_variables_cannot_raise_a_cap(with_policy, monkeypatch):
    with_policy()
    cfg = SandboxConfig(max_vcpus=64, max_mem_mib=65536).validated()
    assert (cfg.max_vcpus, cfg.max_mem_mib) == (1, 768)
    with pytest.raises(ConfigError, match="vcpus=1 is above|cap of 1"):
        cfg.changed(vcpus=2)
    monkeypatch.setenv("SMOLVM_VCPUS", "4")          # a variable is a choice: checked, not clamped
    with pytest.raises(ConfigError, match="vcpus=4 is above the cap of 1"):
        SandboxConfig().validated()


def test_unknown_keys_and_wrong_types_are_errors_that_name_them(tmp_path):
    for text, words in (("max_cpus = 2", "unknown key 'max_cpus'"),
                        ("max_vcpus = '2'", "max_vcpus must be a whole number"),
                        ("max_vcpus = true", "max_vcpus must be a whole number"),
                        ("network = ['none', 'bridge']", "network has 'bridge'; choose from none, nat"),
                        ("network = []", "network must be a non-empty list"),
                        ("output_policy = 'open'", "output_policy must be one of safe, trusted"),
                        ("hostd = 'hostd.sock'", "hostd must be an absolute path"),
                        ("max_vms_per_user = -1", "max_vms_per_user must be a whole number"),
                        ("max_vcpus = ", "it is not TOML")):
        with pytest.raises(ConfigError, match="the policy file .* is wrong") as info:
            policy.parse(text, "/etc/smolvm/policy.toml")
        assert words in str(info.value), text


@needs_root
def test_a_policy_anyone_but_root_can_change_is_refused(with_policy):
    path = with_policy()
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="must be owned by root and writable by root alone"):
        SandboxConfig().validated()
    os.chmod(path, 0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="must be owned by root"):
        policy.load()


@needs_root
def test_the_variable_cannot_point_around_the_real_policy(with_policy, monkeypatch, tmp_path):
    """While /etc/smolvm/policy.toml exists, SMOLVM_POLICY_FILE is ignored: a user
    cannot swap the instructor's file for an empty one of their choosing."""
    real = tmp_path / "real.toml"
    real.write_text("max_vcpus = 1\n")
    monkeypatch.setattr(policy, "POLICY_FILE", str(real))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    monkeypatch.setenv("SMOLVM_POLICY_FILE", str(empty))
    assert policy.load().max_vcpus == 1


def test_without_a_policy_file_there_is_no_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "POLICY_FILE", str(tmp_path / "none.toml"))
    monkeypatch.delenv("SMOLVM_POLICY_FILE", raising=False)
    assert policy.load() is None and SandboxConfig().validated().policy is None
