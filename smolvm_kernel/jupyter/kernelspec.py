"""Write and register the SmolVM Python kernelspec(s)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from smolvm_kernel.config.options import KERNELSPEC_OPTIONS

#: Where the kernelspecs' entry points live (launch.py, gateway.py): at the
#: package's top, at the paths every earlier version wrote into kernel.json.
ENTRY = Path(__file__).resolve().parents[1]
DEFAULT_NAME = "smolvm-python"
DEFAULT_DISPLAY = "SmolVM Python"
#: Options that can be baked into a kernelspec, as SMOLVM_* environment (the
#: settings table's kernelspec rows: mem -> SMOLVM_MEM_MIB, ...).
OPTION_ENV = {option: row.env for option, row in KERNELSPEC_OPTIONS.items()}


def kernel_json(display_name: str = DEFAULT_DISPLAY, **options) -> dict:
    """The kernel.json contents; options (profile, mem, cpus, ...) become env vars."""
    env = {OPTION_ENV[k]: str(v) for k, v in options.items() if v is not None}
    spec = {
        # -S: the launcher listens on the ports before the site import (launch.py).
        "argv": [sys.executable, "-S", str(ENTRY / "launch.py"), "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        # Either mode works; "message" avoids signalling the kernel process.
        "interrupt_mode": "message",
        "metadata": {"debugger": False, "smolvm": {"options": options}},
    }
    if env:
        spec["env"] = env
    return spec


def gateway_kernel_json(display_name: str, remote_hosts: list[str], launch_timeout: int = 60,
                        provisioner: str = "smolvm-distributed-provisioner", **options) -> dict:
    """A kernelspec for a Jupyter gateway's kernel provisioner (gateway_provisioners'
    DistributedProvisioner, as placement.py extends it to skip hosts that are
    down or full): the gateway fills in the launch values and runs the argv on
    the host it picks, where gateway.py starts the SmolVM kernel and answers by
    the provisioner's protocol. This file and Python must be at the
    same paths on every host."""
    spec = kernel_json(display_name, **options)
    spec["argv"] = [sys.executable, str(ENTRY / "gateway.py"),
                    "--kernel-id", "{kernel_id}", "--port-range", "{port_range}",
                    "--response-address", "{response_address}", "--public-key", "{public_key}"]
    spec["interrupt_mode"] = "signal"        # the provisioner's own signal goes through the comm port
    spec["metadata"]["kernel_provisioner"] = {
        "provisioner_name": provisioner,
        "config": {"remote_hosts": list(remote_hosts), "launch_timeout": launch_timeout}}
    return spec


def install(name: str = DEFAULT_NAME, display_name: str | None = None, user: bool = False,
            prefix: str | None = None, gateway_hosts: list[str] | None = None, **options) -> str:
    """Install the kernelspec; return the directory it went to."""
    from jupyter_client.kernelspec import KernelSpecManager
    from smolvm_kernel.config import SandboxConfig

    from traitlets import TraitError

    from smolvm_kernel.errors import ConfigError

    # Validate baked options now, not when a notebook starts.
    try:
        cfg = SandboxConfig(**{KERNELSPEC_OPTIONS[k].name: v for k, v in options.items() if v is not None})
    except TraitError as exc:
        raise ConfigError.from_trait(exc) from None
    cfg.validated()
    if display_name is None:
        from smolvm_kernel.images.recipe import PROFILES

        course = options.get("profile") not in (None, *PROFILES)
        display_name = (f"{DEFAULT_DISPLAY} ({options['profile']} course)" if course else
                        DEFAULT_DISPLAY if name == DEFAULT_NAME else f"{DEFAULT_DISPLAY} ({name})")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        spec = (gateway_kernel_json(display_name, gateway_hosts, **options) if gateway_hosts
                else kernel_json(display_name, **options))
        (d / "kernel.json").write_text(json.dumps(spec, indent=2))
        assets = resources.files("smolvm_kernel._kernelspec")
        for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
            with resources.as_file(assets.joinpath(logo)) as src:
                shutil.copy(src, d / logo)
        return KernelSpecManager().install_kernel_spec(str(d), name, user=user, prefix=prefix)
