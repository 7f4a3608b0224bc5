"""The SmolVMError hierarchy: every error carries its fields and says what to do."""

from __future__ import annotations

from collections.abc import Sequence


class SmolVMError(Exception):
    """Root of every error smolvm-kernel raises on purpose."""


class ConfigError(SmolVMError, ValueError):
    """A configuration value is out of range or of the wrong kind."""

    def __init__(self, name: str, value: object, fix: str) -> None:
        self.name, self.value, self.fix = name, value, fix
        super().__init__(f"invalid {name}={value!r}: {fix}" if name else fix)

    @classmethod
    def from_trait(cls, exc: Exception) -> ConfigError:
        """Wrap a traitlets validation error (its message already names value and fix)."""
        return cls("", None, str(exc))


class ToolNotFound(SmolVMError, FileNotFoundError):
    """A program the host needs is missing."""

    def __init__(self, tool: str, install: str, setting: str | None = None) -> None:
        self.tool, self.install, self.setting = tool, install, setting
        msg = f"{tool} not found on PATH; install {install}"
        if setting:
            msg += f", or set {setting}"
        super().__init__(msg)


class CommandFailed(SmolVMError, RuntimeError):
    """A subprocess the host ran exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, hint: str = "") -> None:
        self.argv, self.returncode = list(argv), returncode
        self.stderr_tail = "\n".join(stderr.strip().splitlines()[-15:])
        msg = f"{argv[0]} exited with status {returncode}: {' '.join(map(str, argv))}"
        if self.stderr_tail:
            msg += f"\n--- stderr (tail) ---\n{self.stderr_tail}"
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)


class ImageNotFound(SmolVMError, FileNotFoundError):
    """The guest image for a profile has not been built."""

    def __init__(self, profile: str) -> None:
        self.profile = profile
        super().__init__(
            f"no guest image for profile {profile!r}; build it with "
            f"`smolvm-kernel image build --profile {profile}` (needs mmdebstrap and network "
            f"access to the Debian archive), or pass auto_build=True")


class ImageBuildError(SmolVMError, RuntimeError):
    """Building a guest image failed; nothing was left in the cache."""


class BootTimeout(SmolVMError, TimeoutError):
    """The guest did not answer within the boot timeout."""

    def __init__(self, seconds: float, stage: str, console_tail: str) -> None:
        self.seconds, self.stage, self.console_tail = seconds, stage, console_tail
        super().__init__(
            f"the microVM did not reach {stage} within {seconds:.0f} s; raise "
            f"SandboxConfig.boot_timeout (SMOLVM_BOOT_TIMEOUT) on a slow or loaded host, "
            f"or run `smolvm-kernel doctor`.\n--- guest console (tail) ---\n{console_tail}")


class GuestDied(SmolVMError, RuntimeError):
    """The VM, its agent or its kernel is gone."""

    def __init__(self, what: str, detail: str = "") -> None:
        self.what, self.detail = what, detail
        msg = f"{what}; its state is lost. Call reset() (or restart the kernel) for a fresh VM."
        if detail:
            msg += f"\n--- details ---\n{detail}"
        super().__init__(msg)


class ProtocolError(SmolVMError, RuntimeError):
    """The guest broke the wire protocol; the channel was closed."""


class ProtocolMismatch(ProtocolError):
    """Host and guest speak different wire protocol versions."""

    def __init__(self, host: int, guest: object) -> None:
        self.host, self.guest = host, guest
        super().__init__(
            f"the guest agent speaks protocol {guest}, this host speaks {host}: the image is "
            f"stale; rebuild it with `smolvm-kernel image build`")


class ExecutionTimeout(SmolVMError, TimeoutError):
    """A cell ran past its timeout and was interrupted."""

    def __init__(self, seconds: float, reset: bool) -> None:
        self.seconds, self.reset = seconds, reset
        tail = ("the guest did not respond to the interrupt, so the VM was reset (state lost)"
                if reset else "it was interrupted; the VM and its state are intact")
        super().__init__(f"execution exceeded its {seconds:g} s timeout; {tail}")


class SandboxStopped(SmolVMError, RuntimeError):
    """An operation needs a running VM but the sandbox is stopped."""

    def __init__(self, why: str = "the sandbox is stopped; call start() or reset() first") -> None:
        super().__init__(why)


class NetworkError(SmolVMError):
    """Networking was asked for and cannot be set up here."""


class GuestFileError(SmolVMError, OSError):
    """The guest refused a file operation (path outside the allowed folders, too large)."""
