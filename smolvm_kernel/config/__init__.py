"""Every user-tunable value of a microVM, checked against the instructor's policy.

- options.py: the settings table, one row per setting (type, default, SMOLVM_*
  variable, kernelspec and %smolvm option, help);
- sandbox_config.py: ``SandboxConfig``, the traitlets class made from it, and
  ``load_config`` (the Jupyter config files);
- checks.py: every check of the values, alone and together;
- caps.py: the instructor's caps applied, a step before the checks together.
"""

from __future__ import annotations

from smolvm_kernel.config.options import (LIVE_SETTINGS, MAX_DISK_MIB, MAX_MEM_MIB, MAX_VCPUS, MIN_DISK_MIB,
                                          MIN_MEM_MIB, USER_SETTINGS)
from smolvm_kernel.config.sandbox_config import SandboxConfig, load_config

__all__ = ["LIVE_SETTINGS", "MAX_DISK_MIB", "MAX_MEM_MIB", "MAX_VCPUS", "MIN_DISK_MIB", "MIN_MEM_MIB",
           "USER_SETTINGS", "SandboxConfig", "load_config"]
