"""Placing SmolVM kernels on hosts: gateway_provisioners' DistributedProvisioner,
extended through its documented extension point (``_determine_next_host``).

The provisioner's own round-robin picks a host without knowing whether it is
up or has room. This one starts from the host round-robin picked and takes
the first host, in the list's order, that

* answers on its SSH port within 2 s (else "down"), and
* says, over SSH, that its admission service would start a VM of the shape a
  kernel there gets (``smolvm-kernel admission``: the host's own policy and
  budget, hostd.py; else "full" with the host's words).

Skipped hosts are logged with the reason; when no host can take the kernel,
the start fails with every host's reason. Kernelspec:
``"provisioner_name": "smolvm-distributed-provisioner"`` (``smolvm-kernel
install --gateway HOSTS``).
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from gateway_provisioners.config_mixin import ssh_port
from gateway_provisioners.distributed import DistributedProvisioner, kernel_log_dir

#: Seconds a host's SSH port may take to answer before the host counts as down.
PROBE_TIMEOUT_S = 2.0
#: A kernel id names a log file on the remote host: a UUID's letters only.
_KERNEL_ID = re.compile(r"^[0-9A-Za-z-]{1,64}$")


class SmolVMProvisioner(DistributedProvisioner):
    """DistributedProvisioner that skips hosts that are down or full, and tells a
    kernel restarted after its host died where it went."""

    #: kernel id -> why its last host lost it, until the kernel starts again
    #: (a restart may make a new provisioner; the kernel id stays).
    lost: dict[str, str] = {}
    #: Kernels being stopped on purpose (shutdown, restart): their end is no loss.
    stopping: set[str] = set()

    async def poll(self) -> int | None:
        code = await super().poll()
        if (code is not None and self.assigned_host and self.kernel_id not in SmolVMProvisioner.lost
                and self.kernel_id not in SmolVMProvisioner.stopping):
            why = self.host_problem(self.assigned_host)
            SmolVMProvisioner.lost[self.kernel_id] = (f"host {self.assigned_host} {why}" if why else
                                                      f"kernel on {self.assigned_host} ended by itself")
        return code

    async def shutdown_requested(self, restart: bool = False) -> None:
        SmolVMProvisioner.stopping.add(self.kernel_id)
        await super().shutdown_requested(restart)

    async def kill(self, restart: bool = False) -> None:
        SmolVMProvisioner.stopping.add(self.kernel_id)
        await super().kill(restart)

    async def terminate(self, restart: bool = False) -> None:
        SmolVMProvisioner.stopping.add(self.kernel_id)
        await super().terminate(restart)

    def _launch_remote_process(self, cmd: list[str], **kwargs):
        SmolVMProvisioner.stopping.discard(self.kernel_id)
        lost = SmolVMProvisioner.lost.pop(self.kernel_id, None)
        if lost:
            note = (f"[smolvm] this kernel's {lost}; the restart placed it on {self.assigned_host}: "
                    f"a fresh microVM, the earlier state is gone\n")
            cmd = [*cmd, "--notice-b64", base64.b64encode(note.encode()).decode()]
        return super()._launch_remote_process(cmd, **kwargs)

    def _build_startup_command(self, cmd: list[str], **kwargs) -> list[str] | str:
        """The remote shell command, every value quoted.

        gateway_provisioners 0.5.0 writes ``export KERNEL_USERNAME="{value}"``
        and the argv unquoted into the command it runs over SSH, and under a
        Kernel Gateway ``KERNEL_*`` values come from the client: a username such
        as ``x";touch /tmp/p;"`` was a shell on every host as the remote user.
        Here each value is one shell word (shlex.quote), and a kernel id, which
        also names the remote log file, must look like one."""
        env_dict = kwargs["env"]
        kid = env_dict.get("KERNEL_ID")
        if kid is not None and not _KERNEL_ID.match(str(kid)):
            self.log_and_raise(ValueError(f"kernel id {str(kid)[:80]!r} is not a kernel id (letters, digits, '-')"))
        self.kernel_log = os.path.join(kernel_log_dir, f"kernel-{kid}.log")
        if self.ip_is_local(self.ip):
            return cmd           # an argv list, run without a shell
        exports = {"KERNEL_ID": kid, "KERNEL_USERNAME": env_dict.get("KERNEL_USERNAME"),
                   "GP_IMPERSONATION_ENABLED": env_dict.get("GP_IMPERSONATION_ENABLED"),
                   **self.kernel_spec.env}
        words = [f"export {key}={shlex.quote(str(value))};" for key, value in exports.items()
                 if value and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key)]
        return ("".join(words) + "nohup " + " ".join(shlex.quote(str(a)) for a in cmd)
                + f" >> {shlex.quote(self.kernel_log)} 2>&1 & echo $!")

    def _determine_next_host(self, env_dict: dict) -> str:
        first = super()._determine_next_host(env_dict)
        if env_dict.get("KERNEL_REMOTE_HOST"):
            return first            # the client asked for this host
        hosts = list(self.remote_hosts)
        start = hosts.index(first) if first in hosts else 0
        skipped = []
        for host in hosts[start:] + hosts[:start]:
            why = self.host_problem(host)
            if why is None:
                if skipped:
                    self.log.warning(f"SmolVM placement of kernel {self.kernel_id}: {'; '.join(skipped)}; "
                                     f"placed on {host}")
                return host
            skipped.append(f"{host} skipped: {why}")
        self.log_and_raise(RuntimeError("no host can take a SmolVM kernel now: " + "; ".join(skipped)))
        raise AssertionError("unreachable")

    def host_problem(self, host: str) -> str | None:
        """Why ``host`` cannot take a kernel now, or None. This machine itself is
        asked directly, as the provisioner launches on it without SSH."""
        if self.ip_is_local(host):
            proc = subprocess.run(["/bin/sh", "-c", admission_command()], capture_output=True, text=True,
                                  timeout=60)
            lines = proc.stdout.splitlines()
        else:
            try:
                socket.create_connection((host, ssh_port), timeout=PROBE_TIMEOUT_S).close()
            except OSError as exc:
                return f"down (its SSH port {ssh_port} does not answer: {exc.strerror or exc})"
            try:
                lines = self._rsh(host, admission_command())
            except Exception as exc:        # an SSH failure is the host's problem, not the start's
                return f"unreachable over SSH ({exc})"
        answer = (lines[-1] if lines else "").strip()
        if answer.startswith("ok"):
            return None
        return f"full ({answer.removeprefix('refused: ') or 'no answer from smolvm-kernel admission'})"


def admission_command() -> str:
    """The remote command: this install's CLI, at the same path on every host."""
    cli = Path(sys.executable).with_name("smolvm-kernel")
    return f"{shlex.quote(str(cli))} admission 2>&1"
