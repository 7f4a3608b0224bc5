"""Kernelspec install and the jupyter_smolvm_config file."""

from __future__ import annotations

import json
import sys

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from smolvm_kernel.config import load_config
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.jupyter import kernelspec


def test_install_registers_smolvm_python_with_logos(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    path = kernelspec.install(prefix=str(tmp_path))
    spec = KernelSpecManager().get_kernel_spec("smolvm-python")
    assert spec.display_name == "SmolVM Python"
    # the launcher, run without the site import (smolvm_kernel/launch.py)
    assert spec.argv[:2] == [sys.executable, "-S"] and spec.argv[2].endswith("smolvm_kernel/launch.py")
    assert __import__("pathlib").Path(spec.argv[2]).is_file() and "{connection_file}" in spec.argv
    assert spec.interrupt_mode == "message" and spec.language == "python"
    names = {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert {"kernel.json", "logo-32x32.png", "logo-64x64.png", "logo-svg.svg"} <= names


def test_extra_kernelspec_bakes_options_into_env(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    kernelspec.install("smolvm-scipy", prefix=str(tmp_path), profile="scipy", mem=1024, cpus=1)
    spec = KernelSpecManager().get_kernel_spec("smolvm-scipy")
    assert spec.env == {"SMOLVM_PROFILE": "scipy", "SMOLVM_MEM_MIB": "1024", "SMOLVM_VCPUS": "1"}
    assert spec.display_name == "SmolVM Python (smolvm-scipy)"


def test_bad_baked_option_is_refused_at_install(tmp_path):
    with pytest.raises(ConfigError, match="mem_mib=1"):
        kernelspec.install("bad", prefix=str(tmp_path), mem=1)


def test_config_file_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    (tmp_path / "jupyter_smolvm_config.py").write_text("c.SandboxConfig.mem_mib = 1024\n")
    (tmp_path / "jupyter_smolvm_config.json").write_text(json.dumps({"SandboxConfig": {"vcpus": 1}}))
    cfg = load_config()
    assert (cfg.mem_mib, cfg.vcpus) == (1024, 1)


def test_bad_config_file_value_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    (tmp_path / "jupyter_smolvm_config.py").write_text("c.SandboxConfig.profile = 'huge'\n")
    with pytest.raises(ConfigError, match="profile='huge'"):
        load_config()
