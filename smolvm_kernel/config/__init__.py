"""Every user-tunable value of a microVM, checked against the instructor's policy.

``SandboxConfig`` (sandbox_config.py) is the traitlets class the rest of the
package uses; ``load_config`` reads it from the Jupyter config path.
"""

from __future__ import annotations

from smolvm_kernel.config.sandbox_config import (LIVE_SETTINGS, MAX_DISK_MIB, MAX_MEM_MIB, MAX_VCPUS,
                                                 MIN_DISK_MIB, MIN_MEM_MIB, USER_SETTINGS, SandboxConfig,
                                                 load_config)

__all__ = ["LIVE_SETTINGS", "MAX_DISK_MIB", "MAX_MEM_MIB", "MAX_VCPUS", "MIN_DISK_MIB", "MIN_MEM_MIB",
           "USER_SETTINGS", "SandboxConfig", "load_config"]
