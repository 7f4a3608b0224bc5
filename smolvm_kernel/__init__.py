"""smolvm-kernel: run Jupyter cells inside a dedicated microVM.

Example::

    from smolvm_kernel import Sandbox
    with Sandbox(vcpus=1, mem_mib=512) as sb:
        for out in sb.execute("6 * 7"):
            print(out)
"""

from __future__ import annotations

from smolvm_kernel._version import __version__

__all__ = ["Sandbox", "SandboxConfig", "Output", "safe_output", "__version__"]


def load_ipython_extension(ipython) -> None:
    """``%load_ext smolvm_kernel``: register the %%smolvm / %smolvm magics."""
    from smolvm_kernel.jupyter.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from smolvm_kernel.jupyter.magics import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str):
    # Lazy: `python -m smolvm_kernel` and the CLI should not pay for imports
    # they do not use.
    if name in ("Sandbox", "Output"):
        from smolvm_kernel.vm import sandbox
        return getattr(sandbox, name)
    if name == "safe_output":
        from smolvm_kernel.jupyter.output_policy import safe_output
        return safe_output
    if name == "SandboxConfig":
        from smolvm_kernel.config import SandboxConfig
        return SandboxConfig
    raise AttributeError(name)
