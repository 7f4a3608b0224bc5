"""SandboxConfig: every user-tunable value, checked, with SMOLVM_* fallbacks.

Values come, in increasing priority, from the defaults, ``SMOLVM_*``
environment variables, a traitlets config file (``jupyter_smolvm_config.py``),
and keyword arguments::

    SandboxConfig(vcpus=2, mem_mib=1024).validated()

The settings are declared in options.py, checked in checks.py; the
instructor's caps are applied by caps.py.
"""

from __future__ import annotations

import os

from traitlets import default, validate
from traitlets.config import Configurable
from traitlets.traitlets import TraitError

from smolvm_kernel.config import caps, checks
from smolvm_kernel.config.options import CAPPED_ENV, IGNORE_ENV, OPTIONS, env
from smolvm_kernel.errors import ConfigError
from smolvm_kernel.host import policy as host_policy


class SandboxConfig(Configurable):
    """Size, image, backend and limits of one microVM.

    ``validated()`` is what a VM starts on: each value checked alone, the
    instructor's caps applied, then the values checked together.
    """

    #: The instructor's policy in force (smolvm_kernel.host.policy), set by apply_policy().
    policy = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # What was set, by argument or config file (reading a default counts as
        # setting it for traitlets, so this is recorded now).
        section = self.config.get("SandboxConfig", {}) if self.config else {}
        self._given = {*kwargs, *section}

    # One trait per row of the settings table (options.py), and a @default for
    # each that has a SMOLVM_* variable or a default of the host. In a class
    # body locals() is the namespace the metaclass will receive (the docs of
    # locals() say so), so they are put there by name, as if written out.
    for _option in OPTIONS.values():
        locals()[_option.name] = _option.trait()
        if _option.dynamic:
            locals()[f"_{_option.name}_from_env"] = default(_option.name)(
                lambda self, option=_option: option.from_env())
    del _option

    @validate(*checks.CHECKS)
    def _check(self, proposal):
        return checks.check(proposal["trait"].name, proposal["value"])

    def limit_problems(self, values: dict | None = None) -> list[str]:
        """Why ``values`` (default: this config's own) exceed the host's limits.

        Each entry names the value, the limit and the setting that raises it.
        """
        return checks.limit_problems(self, values)

    def combination_problems(self) -> list[str]:
        """Settings that are valid alone but not together."""
        return checks.combination_problems(self)

    def chosen(self) -> set[str]:
        """The capped settings the user chose: a value given (argument, config
        file) or its SMOLVM_* variable set. The policy checks these rather than
        bringing them within its caps."""
        return {name for name, var in CAPPED_ENV.items() if name in self._given or env(var) is not None}

    def apply_policy(self, pol, chosen: set[str] | frozenset[str] = frozenset()) -> SandboxConfig:
        """Put the instructor's policy ``pol`` (None: none) in force: its caps
        become this config's limits, and what the user did not choose is brought
        within them (caps.py). Checks nothing; returns this config."""
        self.policy = pol
        if pol is not None:
            caps.apply(self, pol, chosen)
        return self

    def validated(self) -> SandboxConfig:
        """This config, checked, with this host's policy applied.

        Every lazy default is read (env fallbacks included) and each value
        checked alone; the policy is loaded and applied (apply_policy); then the
        values are checked together. Raises ConfigError naming the value and the
        fix when a value is out of range, above a host limit or a cap, or at odds
        with another setting or the policy.
        """
        chosen = self.chosen()
        checks.check_values(self)
        self.apply_policy(host_policy.load(), chosen)
        checks.check_together(self)
        return self

    def changed(self, **changes) -> SandboxConfig:
        """A copy with ``changes`` applied, validated against ranges and host limits.

        Raises ConfigError naming the value and the fix; this config is untouched.
        """
        values = {name: getattr(self, name) for name in self.trait_names()
                  if self.trait_metadata(name, "config")}
        values.update(changes)
        try:
            new = SandboxConfig(**values)
        except TraitError as exc:
            raise ConfigError.from_trait(exc) from None
        return new.validated()

    @classmethod
    def builtin(cls) -> SandboxConfig:
        """The built-in defaults alone: no config file, no SMOLVM_* variable
        (what a kernel runs on while it reports that those are wrong)."""
        token = IGNORE_ENV.set(True)
        try:
            cfg = cls()
            for name in cfg.trait_names():
                getattr(cfg, name)
            # A small host's limits may be below the defaults (half of 768 MiB of RAM).
            cfg.vcpus = min(cfg.vcpus, cfg.max_vcpus)
            cfg.mem_mib = min(cfg.mem_mib, cfg.max_mem_mib)
            cfg.disk_mib = min(cfg.disk_mib, cfg.max_disk_mib)
        finally:
            IGNORE_ENV.reset(token)
        try:
            pol = host_policy.load()
        except ConfigError:      # the kernel reports it, and starts no VM meanwhile
            pol = None
        return cfg.apply_policy(pol)


def load_config():
    """Read ``jupyter_smolvm_config.py`` / ``.json`` from the Jupyter config path.

    The result is a traitlets ``SandboxConfig`` whose values come from those
    files (section ``c.SandboxConfig``), then SMOLVM_* variables, then defaults,
    validated (ConfigError names a wrong value and the fix).
    """
    from jupyter_core.paths import jupyter_config_path
    from traitlets.config.loader import Config, JSONFileConfigLoader, PyFileConfigLoader

    merged = Config()
    # jupyter_config_path() lists the highest priority first; load lowest first.
    for directory in reversed(jupyter_config_path()):
        for loader_cls, name in ((JSONFileConfigLoader, "jupyter_smolvm_config.json"),
                                 (PyFileConfigLoader, "jupyter_smolvm_config.py")):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                try:
                    merged.merge(loader_cls(name, path=directory).load_config())
                except Exception as exc:   # a syntax error, bad JSON, an exception in the file
                    raise ConfigError("", None, f"{path} cannot be read: {type(exc).__name__}: {exc}") from None
    try:
        cfg = SandboxConfig(config=merged)
    except TraitError as exc:
        raise ConfigError.from_trait(exc) from None
    return cfg.validated()
