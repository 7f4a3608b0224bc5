"""The instructor's caps applied to a SandboxConfig: a step of its own, before the checks.

The policy (smolvm_kernel.host.policy) caps sizes, the cell timeout, output,
idle time and the choices of network, profile and output policy. Applying it
changes the config: the size caps become its host limits (a user's own
``max_*`` cannot raise them), and a capped setting the user did not choose is
brought within its cap. One the user chose (options.CAPPED_ENV: a value given,
or its SMOLVM_* variable set) is left as it is, for checks.check_together to
refuse with whose cap it is.
"""

from __future__ import annotations

from smolvm_kernel.host.policy import workdir_within


def apply(cfg, pol, chosen: set[str] | frozenset[str]) -> None:
    """Bring ``cfg`` (a SandboxConfig) within the policy ``pol``, but for the ``chosen`` settings."""
    for name in ("vcpus", "mem_mib", "disk_mib"):
        cap = getattr(pol, f"max_{name}")
        if cap is not None and getattr(cfg, f"max_{name}") > cap:
            setattr(cfg, f"max_{name}", cap)
        if name not in chosen:
            setattr(cfg, name, min(getattr(cfg, name), getattr(cfg, f"max_{name}")))
    if pol.max_exec_timeout and "exec_timeout" not in chosen and not 0 < cfg.exec_timeout <= pol.max_exec_timeout:
        cfg.exec_timeout = float(pol.max_exec_timeout)
    if pol.max_output_mib is not None and "max_output_mib" not in chosen:
        cfg.max_output_mib = min(cfg.max_output_mib, pol.max_output_mib)
    if pol.pause_after and not 0 < cfg.pause_after <= pol.pause_after:
        # Not a user's right but the host's memory: brought within, not refused.
        cfg.pause_after = float(pol.pause_after)
    if pol.output_policy is not None and "output_policy" not in chosen:
        cfg.output_policy = pol.output_policy
    if pol.workdir is not None and "workdir_mode" not in chosen and not workdir_within(cfg.workdir_mode, pol.workdir):
        cfg.workdir_mode = pol.workdir
    if pol.network is not None and "network" not in chosen and cfg.network not in pol.network:
        cfg.network = pol.network[0]
    if pol.profiles is not None and "profile" not in chosen and cfg.profile not in pol.profiles:
        cfg.profile = pol.profiles[0]
