"""The instructor's policy: caps on every VM of this host that users cannot raise.

One root-owned TOML file, ``/etc/smolvm/policy.toml``, read by every SmolVM
kernel and Sandbox on the host. A user's own settings (config files,
SMOLVM_* variables, the panel, ``%smolvm config``) choose values within
these caps; a value beyond one is refused with the cap and whose it is.

    # /etc/smolvm/policy.toml (owned by root, not writable by anyone else)
    max_vcpus = 2              # per VM
    max_mem_mib = 1024
    max_disk_mib = 4096
    max_exec_timeout = 600     # every cell gets a timeout of at most this many seconds
    network = ["none"]         # the network modes users may pick ("none", "nat")
    profiles = ["base"]        # the guest images users may pick
    output_policy = "safe"     # locked: users cannot switch to "trusted"
    workdir = "read-write"     # the notebook's folder in the VM: at most read-write, read-only or off
    max_output_mib = 16        # most output a cell may send the notebook
    pause_after = 600          # an idle VM is paused to disk after at most this many seconds
    max_checkpoints = 10       # checkpoints a user may keep (0 = checkpoints off)
    max_checkpoint_mib = 4096  # their disk, all together
    audit_log = "/var/log/smolvm/audit.jsonl"   # one audit log for the host (audit.py)
    hostd = "/run/smolvm/hostd.sock"   # every VM needs a grant from this service (hostd.py),
    max_vms_per_user = 2               # which enforces these, and the per-VM caps above again
    max_mem_mib_per_user = 2048
    host_max_vms = 40
    host_max_guest_mem_mib = 32768     # all VMs' guest memory together
    host_reserve_mib = 2048            # host memory never given to VMs

Under ``hostd``, the root service checks each VM's shape itself, from this
file as it read it, and does not trust the kernel's own check: vCPUs against
max_vcpus (and the host's cores), memory against max_mem_mib, and the disk,
profile and network a kernel must then send against max_disk_mib, profiles and
network (a request that leaves one out is refused while the policy sets that
key). host_max_guest_mem_mib, host_max_vms and host_reserve_mib also size the
one cgroup all of hostd's VMMs share (grants.host_limits).

Every key is optional; an unknown key or a wrong type is an error (a typo
must not drop a cap), and so is a file that someone other than root can
write: the kernel then starts no VM and says why. Without the file there is
no policy.

``SMOLVM_POLICY_FILE`` names another file, for tests and for trying a policy
out, and only while ``/etc/smolvm/policy.toml`` does not exist: a user can
never point around the real one.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib

from smolvm_kernel.errors import ConfigError

POLICY_FILE = "/etc/smolvm/policy.toml"

#: The working folder's modes, most open first: a policy's value is the most a user may have.
WORKDIR_MODES = ("read-write", "read-only", "off")
_INTS = ("max_vcpus", "max_mem_mib", "max_disk_mib", "max_exec_timeout", "max_output_mib",
         "max_vms_per_user", "max_mem_mib_per_user", "host_max_vms", "host_max_guest_mem_mib",
         "host_reserve_mib", "pause_after", "max_checkpoints", "max_checkpoint_mib")
_LISTS = {"network": ("none", "nat"), "profiles": None}
_CHOICES = {"output_policy": ("safe", "trusted"), "workdir": WORKDIR_MODES}
_PATHS = ("audit_log", "hostd")


@dataclasses.dataclass(frozen=True)
class Policy:
    path: str
    max_vcpus: int | None = None
    max_mem_mib: int | None = None
    max_disk_mib: int | None = None
    max_exec_timeout: int | None = None
    max_output_mib: int | None = None
    network: tuple[str, ...] | None = None
    profiles: tuple[str, ...] | None = None
    output_policy: str | None = None
    workdir: str | None = None
    audit_log: str | None = None
    #: The admission service's socket (hostd.py): every VM needs its grant, which
    #: is where the per-user and host-wide keys below are enforced.
    hostd: str | None = None
    max_vms_per_user: int | None = None
    max_mem_mib_per_user: int | None = None
    host_max_vms: int | None = None
    host_max_guest_mem_mib: int | None = None
    host_reserve_mib: int | None = None
    #: Idle VMs are paused to disk after at most this many seconds (pause.py);
    #: a user's longer value, or 0, is brought down to it.
    pause_after: int | None = None
    #: Checkpoints a user may keep (0: none may be taken), and their disk in
    #: MiB, all together (vm/checkpoints.py).
    max_checkpoints: int | None = None
    max_checkpoint_mib: int | None = None

    @property
    def whose(self) -> str:
        return f"the instructor's policy ({self.path})"

    def caps(self) -> dict[str, object]:
        """The caps this policy sets, by name (for status lines and the panel)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("path", "audit_log", "hostd") and getattr(self, f.name) is not None}

    def problems(self, cfg) -> list[str]:
        """Why ``cfg`` (a SandboxConfig) is outside this policy; [] if it is not.
        The size caps are applied to the config's own host limits instead (see
        SandboxConfig.validated), so their messages come from there."""
        out = []
        ask = "ask the instructor to change it"
        if self.network is not None and cfg.network not in self.network:
            out.append(f"network={cfg.network!r} is not allowed by {self.whose}, which allows "
                       f"{', '.join(repr(n) for n in self.network)}; {ask}")
        if self.profiles is not None and cfg.profile not in self.profiles:
            out.append(f"profile={cfg.profile!r} is not allowed by {self.whose}, which allows "
                       f"{', '.join(repr(p) for p in self.profiles)}; {ask}")
        if self.output_policy is not None and cfg.output_policy != self.output_policy:
            out.append(f"output_policy={cfg.output_policy!r}: {self.whose} sets it to "
                       f"{self.output_policy!r}; {ask}")
        if self.workdir is not None and not workdir_within(cfg.workdir_mode, self.workdir):
            out.append(f"workdir_mode={cfg.workdir_mode!r}: {self.whose} allows the notebook's folder "
                       f"at most {self.workdir!r}; {ask}")
        if self.max_exec_timeout and not 0 < cfg.exec_timeout <= self.max_exec_timeout:
            what = "no timeout" if not cfg.exec_timeout else f"a timeout of {cfg.exec_timeout:g} s"
            out.append(f"exec_timeout={cfg.exec_timeout:g} asks for {what}; {self.whose} allows at most "
                       f"{self.max_exec_timeout} s per cell; {ask}")
        if self.max_output_mib is not None and cfg.max_output_mib > self.max_output_mib:
            out.append(f"max_output_mib={cfg.max_output_mib} is above the cap of {self.max_output_mib} "
                       f"set by {self.whose}; {ask}")
        return out


def workdir_within(mode: str, cap: str) -> bool:
    """Whether the working-folder ``mode`` is no more open than ``cap``."""
    return WORKDIR_MODES.index(mode) >= WORKDIR_MODES.index(cap)


def parse(text: str, path: str) -> Policy:
    """A policy from TOML text; ConfigError naming the key and the fix otherwise."""
    def bad(fix: str) -> ConfigError:
        return ConfigError("", None, f"the policy file {path} is wrong: {fix}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise bad(f"it is not TOML ({exc})") from None
    values: dict[str, object] = {}
    for key, value in data.items():
        if key in _INTS:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(f"{key} must be a whole number of at least 0, not {value!r}")
            values[key] = value
        elif key in _LISTS:
            allowed = _LISTS[key]
            if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                raise bad(f"{key} must be a non-empty list of names, not {value!r}")
            unknown = [v for v in value if allowed is not None and v not in allowed]
            if unknown:
                raise bad(f"{key} has {unknown[0]!r}; choose from {', '.join(allowed)}")
            values[key] = tuple(value)
        elif key in _PATHS:
            if not (isinstance(value, str) and os.path.isabs(value)):
                raise bad(f"{key} must be an absolute path, not {value!r}")
            values[key] = value
        elif key in _CHOICES:
            if value not in _CHOICES[key]:
                raise bad(f"{key} must be one of {', '.join(_CHOICES[key])}, not {value!r}")
            values[key] = value
        else:
            known = ", ".join([*_INTS, *_LISTS, *_CHOICES, *_PATHS])
            raise bad(f"unknown key {key!r}; the keys are {known}")
    return Policy(path, **values)


def check_owner(path: str, st: os.stat_result) -> None:
    """Only root may be able to change the policy: its owner, and no write bit for
    group or others, on the file and on the folder that holds it."""
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError("", None, f"the policy file {path} must be owned by root and writable by "
                                    f"root alone (chown root: {path}; chmod 644 {path})")
    folder = os.stat(os.path.dirname(os.path.abspath(path)))
    if folder.st_uid != 0 or folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not folder.st_mode & stat.S_ISVTX:
        raise ConfigError("", None, f"the folder of the policy file {path} must be root's and writable "
                                    f"by root alone, or anyone could replace the file")


def policy_path() -> str:
    """/etc/smolvm/policy.toml, or SMOLVM_POLICY_FILE while that does not exist."""
    if os.path.lexists(POLICY_FILE):
        return POLICY_FILE
    return os.environ.get("SMOLVM_POLICY_FILE") or POLICY_FILE


def load(path: str | None = None) -> Policy | None:
    """This host's policy; None without one. ConfigError if it is unsafe or wrong."""
    path = path or policy_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError("", None, f"the policy file {path} cannot be read: {exc}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("", None, f"the policy file {path} is not a regular file")
        check_owner(path, st)
        return parse(fh.read(1 << 20).decode("utf-8", "replace"), path)
