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


#: kernel.json as the flat layout (before the rooms) wrote it, paths made from the package's folder.
def _previous_layout_spec(package) -> dict:
    return {"argv": [sys.executable, "-S", str(package / "launch.py"), "-f", "{connection_file}"],
            "display_name": "SmolVM Python", "language": "python", "interrupt_mode": "message",
            "metadata": {"debugger": False, "smolvm": {"options": {}}}}


def test_a_kernelspec_written_by_the_previous_layout_still_starts_a_kernel(tmp_path, monkeypatch):
    """An upgrade leaves users' kernel.json files as they were: the launcher's
    path must still be there and start the kernel (which answers before any VM)."""
    from pathlib import Path

    from jupyter_client.manager import start_new_kernel

    import smolvm_kernel

    package = Path(smolvm_kernel.__file__).parent
    folder = tmp_path / "share" / "jupyter" / "kernels" / "smolvm-old"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(_previous_layout_spec(package)))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    assert kernelspec.kernel_json()["argv"] == _previous_layout_spec(package)["argv"]
    km, kc = start_new_kernel(kernel_name="smolvm-old", startup_timeout=60, cwd=str(tmp_path))
    try:
        assert kc.kernel_info(reply=True, timeout=30)["content"]["implementation"] == "smolvm-kernel"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_gateway_kernelspec_of_the_previous_layout_finds_its_launcher():
    """`install --gateway` specs name smolvm_kernel/gateway.py on every host."""
    import subprocess
    from pathlib import Path

    import smolvm_kernel

    entry = Path(smolvm_kernel.__file__).parent / "gateway.py"
    assert kernelspec.gateway_kernel_json("SmolVM", ["h1"])["argv"][1] == str(entry)
    proc = subprocess.run([sys.executable, str(entry), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--response-address" in proc.stdout, proc.stderr


def test_the_install_command_offers_every_kernelspec_option_of_the_table(tmp_path, monkeypatch):
    """`smolvm-kernel install` takes its flags from the settings table: each
    kernelspec option is a flag, and what it is given lands in the spec's env."""
    from smolvm_kernel import cli
    from smolvm_kernel.config.options import KERNELSPEC_OPTIONS

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    args = cli.build_parser().parse_args(["install", "--prefix", str(tmp_path), "--name", "smolvm-big",
                                          "--disk", "4096", "--mem", "1024", "--output-policy", "trusted"])
    assert set(KERNELSPEC_OPTIONS) <= set(vars(args))
    assert args.func(args) == 0
    spec = KernelSpecManager().get_kernel_spec("smolvm-big")
    assert spec.env == {"SMOLVM_DISK_MIB": "4096", "SMOLVM_MEM_MIB": "1024", "SMOLVM_OUTPUT_POLICY": "trusted"}
