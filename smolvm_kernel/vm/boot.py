"""Boot: the choices a VM's start makes, and the launch of one Machine.

In order: the host's admission (a grant from hostd, when the policy names
one), the image, the backend and its accelerator, the VM's shape, the
transport, and a cold boot or the shape's ready snapshot (built first, once,
if the settings say so). Then :func:`launch` makes one Machine: its id and
registry row, its cgroup, its network and seed, its VMM, its channel.

The Sandbox (sandbox.py) runs these steps and keeps what they return; none
of them keeps state of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable

from smolvm_kernel.backends.base import VMSpec
from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import ConfigError, SmolVMError
from smolvm_kernel.host import cgroups
from smolvm_kernel.host.admission import HostClient
from smolvm_kernel.host.procs import this_process
from smolvm_kernel.host.registry import Registry, VMRecord
from smolvm_kernel.images import Image, ImageCache
from smolvm_kernel.vm.machine import Hooks, Machine
from smolvm_kernel.vm.snapshot import SnapshotCache

log = logging.getLogger("smolvm_kernel")

Say = Callable[[str], None]


@dataclasses.dataclass
class Plan:
    """What one start will boot: image, VMM, accelerator, shape, transport, snapshot."""

    image: Image
    backend_name: str
    backend_cls: type
    binary: str
    accel_reason: str
    shape: dict
    transport: str
    #: The ready snapshot to restore, or None for a cold boot.
    snapshot: object | None = None
    #: (binary, shape, key) of a snapshot to build in the background once this VM is up.
    build_later: tuple | None = None


async def admit(cfg: SandboxConfig, kernel_id: str) -> HostClient | None:
    """The host's quotas and budget: a grant held for the VM's life (classroom/hostd.py)."""
    pol = cfg.policy
    if pol is None or not pol.hostd:
        return None
    client = await asyncio.to_thread(HostClient, pol.hostd)
    try:
        await asyncio.to_thread(client.admit, cfg.vcpus, cfg.mem_mib, kernel_id,
                                cfg.disk_mib, cfg.profile, cfg.network)
    except BaseException:
        client.close()
        raise
    return client


async def plan(cfg: SandboxConfig, snapshots: SnapshotCache, say: Say,
               progress: Say | None, hostd: HostClient | None = None, ready_snapshot: bool = True) -> Plan:
    """Choose image, backend, accelerator, shape, transport and snapshot for ``cfg``
    (a classroom's snapshot RAM comes from ``hostd``, when it offers it); with
    ``ready_snapshot`` False, no ready snapshot (a checkpoint's start)."""
    from smolvm_kernel.backends.accel import choose_accel, host_tsc_khz
    from smolvm_kernel.backends.qemu import QemuBackend, find_qemu

    cache = ImageCache()
    if cfg.auto_build:
        image = await asyncio.to_thread(cache.ensure, cfg.profile, progress)
    else:
        image = cache.get(cfg.profile)
    backend_name = pick_backend(cfg)
    if backend_name == "firecracker":
        from smolvm_kernel.backends.firecracker import FirecrackerBackend
        backend_cls, binary, accel, accel_reason = (
            FirecrackerBackend, cfg.firecracker_path, "kvm", "Firecracker requires KVM")
    else:
        binary = find_qemu(cfg.qemu_path)
        choice = await asyncio.to_thread(choose_accel, cfg.accel, binary, image)
        backend_cls, accel, accel_reason = QemuBackend, choice.name, choice.reason
    shape = {"vcpus": cfg.vcpus, "mem_mib": cfg.mem_mib, "disk_mib": cfg.disk_mib,
             "accel": accel, "debug_console": cfg.debug_console,
             "tsc_khz": host_tsc_khz() if accel == "tcg" else None, "nic": cfg.network != "none"}
    p = Plan(image=image, backend_name=backend_name, backend_cls=backend_cls, binary=binary,
             accel_reason=accel_reason, shape=shape, transport=pick_transport(cfg, backend_name))
    if p.transport != "serial":
        # SSH keys or a vsock CID belong to one VM: such VMs boot cold (their
        # seed is made per VM; a fork would share its template's host key).
        # A NIC does not: a fork of a NIC shape gets its address after the
        # restore (Sandbox._address).
        if cfg.snapshot != "off":
            say(f"no ready snapshot with transport={p.transport}; cold boot")
    elif not ready_snapshot:
        pass
    elif backend_cls is QemuBackend and cfg.snapshot != "off":
        await _ready_snapshot(p, cfg, snapshots, say, hostd)
    elif cfg.snapshot != "off":
        # The backend can save and load (backends/firecracker.py), but a
        # Firecracker snapshot reopens the template's disk paths, so
        # concurrent forks need the jailer's per-VM chroot first.
        say("ready snapshots are not used with Firecracker yet (forks need the "
            "jailer for per-VM disk paths); cold boot")
    return p


async def launch(p: Plan, cfg: SandboxConfig, *, restore, registry: Registry, hooks: Hooks,
                 hostd: HostClient | None, adopt: Callable[[Machine], None], say: Say) -> str:
    """Make one Machine for ``p`` and hand it to ``adopt`` at once (so that a
    failed launch is torn down by its owner), then launch and connect it.
    Returns the cgroup's description for the status."""
    vm_id = uuid.uuid4().hex[:12]
    owner_pid, owner_start = this_process()
    run_dir = registry.new_run_dir(vm_id)
    registry.add(VMRecord(
        vm_id=vm_id, backend=p.backend_cls.name, accel=p.shape["accel"], profile=cfg.profile,
        run_dir=str(run_dir), owner_pid=owner_pid, owner_start=owner_start,
        vcpus=cfg.vcpus, mem_mib=cfg.mem_mib))
    machine = Machine(vm_id, p.transport, registry=registry, hooks=hooks,
                      max_message_bytes=cfg.max_message_bytes, boot_timeout=cfg.boot_timeout,
                      vmm_overhead_mib=cfg.vmm_overhead_mib, netns=cfg.netns)
    adopt(machine)
    spec = VMSpec(vm_id=vm_id, run_dir=run_dir, image=p.image, transport=p.transport,
                  ram_file=restore.ram if restore else None,
                  ram_named=bool(restore and restore.ram is None and getattr(restore, "ram_named", False)),
                  **p.shape)
    spec.cgroup, note = await asyncio.to_thread(make_cgroup, spec, cfg, hostd)
    await setup_network(machine, spec, cfg, p.backend_name, registry, say, restored=restore is not None)
    backend = p.backend_cls(spec, p.binary, restore=restore) if restore else p.backend_cls(spec, p.binary)
    verb = (getattr(restore, "verb", "restoring microVM from its ready snapshot") if restore
            else "starting microVM")
    say(f"{verb} ({p.backend_cls.name}/{p.shape['accel']})")
    try:
        await machine.launch(backend, restore=restore is not None)
    finally:
        if getattr(restore, "ram_fd", None) is not None:   # the VMM has its own (hostd's memfd)
            os.close(restore.ram_fd)
        if spec.tap_fd is not None:     # the VMM has its own copy, or never started
            os.close(spec.tap_fd)
            spec.tap_fd = None
    return note


def make_cgroup(spec: VMSpec, cfg: SandboxConfig, hostd: HostClient | None):
    """The VMM's cgroup with limits from the VM's shape and a line for the status:
    (group, "limits (cgroup vN)"), or (None, "none (why)"). Under an admission
    service, the one it made for the grant."""
    if hostd is not None and hostd.cgroup is not None:
        group = hostd.cgroup
        return group, f"{group.limits.describe()} (cgroup v{group.version}, made by hostd)"
    limits = cgroups.Limits.for_shape(spec.mem_mib, spec.vcpus, cfg.vmm_overhead_mib, cfg.cpu_limit)
    group = cgroups.create(spec.vm_id, limits)
    if isinstance(group, str):
        return None, f"none ({group})"
    return group, f"{limits.describe()} (cgroup v{group.version})"


async def setup_network(machine: Machine, spec: VMSpec, cfg: SandboxConfig, backend_name: str,
                        registry: Registry, say: Say, restored: bool = False) -> None:
    """TAP, rules, lease and the seed disk (address, SSH keys, vsock secret) for
    this VM, kept on ``machine`` (which tears them down) and recorded in ``spec``
    (the launch closes ``spec.tap_fd`` once the VMM has it). A ``restored`` VM
    has no seed disk (its template had none): its address comes over the
    channel after the restore (Sandbox._address)."""
    seed: dict = {}
    if cfg.network != "none":
        from smolvm_kernel.host.net import LeaseBook, VMNetwork

        if backend_name == "firecracker" and cfg.netns:
            raise ConfigError("netns", cfg.netns, "Firecracker opens its TAP by name in its own "
                              "namespace; use netns='' with Firecracker")
        machine.net = VMNetwork(LeaseBook(registry.db_path), spec.vm_id, pool=cfg.net_pool,
                                netns=cfg.netns, allow=cfg.egress_allow, dns=cfg.dns,
                                max_connections=cfg.net_max_connections,
                                connection_rate=cfg.net_connection_rate)
        for note in machine.net.dns_notes:
            say(f"DNS: {note}")
        say(f"network: TAP and nftables rules for {spec.vm_id}")
        spec.tap_fd = await asyncio.to_thread(machine.net.setup, backend_name != "firecracker")
        spec.tap_name = machine.net.lease.tap
        spec.mac = machine.net.lease.mac
        if not restored:
            seed["net"] = machine.net.guest_config()
    if machine.transport == "ssh":
        from smolvm_kernel.channel.ssh import SSHKeys

        machine.ssh_keys = await asyncio.to_thread(SSHKeys.generate)
        seed["ssh"] = machine.ssh_keys.seed()
    if machine.transport == "vsock":
        # Any host user can connect to a guest's vsock port: the agent
        # answers only the hello that carries this (guest/seed.py).
        machine.link_secret = secrets.token_hex(32)
        seed["link_secret"] = machine.link_secret
    if seed:
        from smolvm_kernel.backends.base import write_seed

        spec.seed = spec.run_dir / "seed.img"
        write_seed(spec.seed, {"smolvm_seed": 1, **seed})
    if machine.transport == "vsock" and spec.vsock_cid is None:
        spec.vsock_cid = 3 + secrets.randbelow(2**31)


# ---------------------------------------------------------------- snapshots

def shape_key(image: Image, binary: str, shape: dict) -> str:
    """What a saved state of a QEMU VM depends on (snapshot.snapshot_key): a
    ready snapshot's cache key, and what a checkpoint must match. ``shape``
    is a Plan's (or a VMSpec's fields of the same names)."""
    from smolvm_kernel.vm.snapshot import qemu_identity, snapshot_key

    return snapshot_key(image, "qemu", shape["accel"], shape["vcpus"], shape["mem_mib"],
                        shape["disk_mib"], qemu_identity(binary), shape["tsc_khz"], shape["nic"])


async def _ready_snapshot(p: Plan, cfg: SandboxConfig, snaps: SnapshotCache, say: Say,
                          hostd: HostClient | None = None) -> None:
    """The snapshot for this shape into ``p``: built first (once, under a lock) if
    missing, or left for a background build after this cold boot."""
    shape, image = p.shape, p.image
    key = shape_key(p.image, p.binary, p.shape)
    shared_ram = hostd.shared_ram if hostd is not None else None
    snap = await asyncio.to_thread(snaps.get, image, key, shared_ram)
    if snap is not None or shape["debug_console"]:
        p.snapshot = snap
        return
    if cfg.snapshot == "auto":
        p.build_later = (p.binary, shape, key)
        say(f"first start of {shape['vcpus']} vCPU / {shape['mem_mib']} MiB: a cold boot now; its "
            f"ready snapshot is built in the background, and later starts take under a second")
        return
    took = [m.get("boot_s", 0) + m.get("save_s", 0) for m in
            (other.manifest() for other in snaps.list()) if m.get("profile") == image.profile]
    estimate = f"about {max(took):.0f} s" if took else "under a minute"
    p.snapshot = await build_snapshot(
        snaps, image, cfg.boot_timeout, p.binary, shape, key, wait=True, say=say,
        announce=f"first start of {shape['vcpus']} vCPU / {shape['mem_mib']} MiB: building its ready "
                 f"snapshot ({estimate}, once; later starts take under a second)")
    if p.snapshot is None:
        say("cold boot instead; the next start tries the snapshot again")


async def build_snapshot(snaps: SnapshotCache, image: Image, boot_timeout: float, binary: str,
                         shape: dict, key: str, *, wait: bool, say: Say, announce: str = ""):
    """The shape's snapshot, built under its lock unless it exists by then; None if
    the build failed, or (``wait=False``) another process holds the lock."""
    lock = await asyncio.to_thread(snaps.lock, image, key) if wait else snaps.lock(image, key, wait=False)
    if lock is None:
        return None
    try:
        snap = snaps.get(image, key)
        if snap is not None:
            return snap
        if announce:
            say(announce)
        t = time.monotonic()
        try:
            snap = await snaps.build(image, key, shape, binary, boot_timeout)
        except (SmolVMError, OSError, asyncio.TimeoutError) as exc:
            log.warning("building a ready snapshot failed: %s", exc)
            say(f"could not build a snapshot ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})")
            return None
        say(f"snapshot ready in {time.monotonic() - t:.1f} s")
        return snap
    finally:
        lock.close()


# ---------------------------------------------------------------- choices

def pick_backend(cfg: SandboxConfig) -> str:
    wanted = cfg.backend
    if wanted == "qemu":
        return "qemu"
    from smolvm_kernel.backends.firecracker import firecracker_available
    ok, why = firecracker_available(cfg.firecracker_path)
    if wanted == "firecracker" and not ok:
        raise ConfigError("backend", "firecracker", why + "; use backend=auto or qemu")
    return "firecracker" if ok else "qemu"


def qemu_vsock_available() -> bool:
    return os.access("/dev/vhost-vsock", os.R_OK | os.W_OK)


def pick_transport(cfg: SandboxConfig, backend: str) -> str:
    """auto: vsock where the backend has it, else virtio-serial (QEMU), else SSH."""
    wanted = cfg.transport
    if wanted == "auto":
        if backend == "firecracker" or qemu_vsock_available():
            return "vsock"
        return "serial"
    if wanted == "serial" and backend != "qemu":
        raise ConfigError("transport", wanted, f"{backend} has no virtio-serial; use transport='auto'")
    if wanted == "vsock" and backend == "qemu" and not qemu_vsock_available():
        raise ConfigError("transport", wanted, "QEMU needs /dev/vhost-vsock for it (modprobe vhost_vsock); "
                                               "use transport='auto' (virtio-serial here)")
    return wanted
