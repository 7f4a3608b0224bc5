"""Sandbox: one microVM, its channel and its in-guest ipykernel.

Example::

    from smolvm_kernel import Sandbox

    with Sandbox(vcpus=1, mem_mib=512) as sb:
        for out in sb.execute("import os; print(os.uname().release); 6*7"):
            print(out.type, out.text)
        sb.stats()["mem_total_kib"]

The kernel, the magic and the widgets are front ends over this class; none
of them talks to a backend or a transport directly. The public methods are
synchronous and thread-safe; the work happens on one background asyncio loop
(:mod:`smolvm_kernel.vm.aio`).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import dataclasses
import logging
import os
import queue
import secrets
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from traitlets import TraitError

from smolvm_guest import wire
from smolvm_guest.wire import Channel
from smolvm_kernel import timeline
from smolvm_kernel.backends.base import Backend, VMSpec
from smolvm_kernel.channel.stream import GuestChannel
from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import (BootTimeout, ConfigError, ExecutionTimeout, GuestDied,
                                  GuestFileError, ProtocolError, SandboxStopped, SmolVMError)
from smolvm_kernel.host import cgroups
from smolvm_kernel.host.admission import HostClient
from smolvm_kernel.host.audit import AuditLog
from smolvm_kernel.host.audit import default_path as audit_default_path
from smolvm_kernel.host.procs import rss_kib, this_process
from smolvm_kernel.host.registry import Registry, VMRecord
from smolvm_kernel.images import Image, ImageCache
from smolvm_kernel.vm import aio
from smolvm_kernel.vm import guest_news
from smolvm_kernel.vm.inbox import Inbox
from smolvm_kernel.vm.lifecycle import SandboxState
from smolvm_kernel.vm.pause import Pauser
from smolvm_kernel.vm.session import Session
from smolvm_kernel.vm.snapshot import SnapshotCache

log = logging.getLogger("smolvm_kernel")

#: After a timeout's interrupt, how long the guest gets to come back idle
#: before the VM is reset. A Python-level interrupt lands in milliseconds;
#: a second allows for a busy TCG guest.
INTERRUPT_GRACE_S = 3.0
_FILE_CHUNK = 1 << 20
#: The heartbeat (see Sandbox._heartbeat): silence before a ping, and how long
#: its answer may take. Generous for a TCG guest on a loaded host: a ping costs
#: the guest about a millisecond of CPU.
HEARTBEAT_IDLE_S = 2.0
HEARTBEAT_TIMEOUT_S = 8.0


_live: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _stop_live_sandboxes() -> None:
    """At interpreter exit, stop every VM this process still runs (files included)."""
    for sb in list(_live):
        try:
            sb.stop()
        except Exception:  # exiting anyway; cleanup will catch what is left
            pass


#: The states in which the VM can be used: a paused one resumes on its own.
_USABLE = (SandboxState.READY, SandboxState.BUSY, SandboxState.PAUSED)


@dataclasses.dataclass(frozen=True)
class Output:
    """One output of an execution, as the guest kernel published it."""

    type: str          # stream | display_data | update_display_data | execute_result | error | clear_output
    content: dict

    @property
    def text(self) -> str:
        """A plain-text rendering: stream text, text/plain data, or the error line."""
        c = self.content
        if self.type == "stream":
            text = c.get("text", "")
        elif self.type == "error":
            return f"{c.get('ename')}: {c.get('evalue')}"
        else:
            data = c.get("data")
            text = data.get("text/plain", "") if isinstance(data, dict) else ""
        return text if isinstance(text, str) else ""   # the guest chose these types

    @property
    def name(self) -> str | None:
        """stdout or stderr, for streams."""
        return self.content.get("name")


class _Died:
    def __init__(self, error: SmolVMError) -> None:
        self.error = error


class Sandbox:
    """A microVM running an ipykernel, with a start/execute/interrupt/reset/stop API."""

    def __init__(self, config: SandboxConfig | None = None, *,
                 progress: Callable[[str], None] | None = None, **overrides) -> None:
        try:
            merged = _merged_config(config, overrides)
        except TraitError as exc:
            raise ConfigError.from_trait(exc) from None
        self.config = merged.validated()
        pol = self.config.policy
        #: Starts, stops, deaths and file transfers, one JSON line each (audit.py);
        #: audit_context adds fields to every entry (the kernel's id).
        self.audit = AuditLog(pol.audit_log if pol and pol.audit_log else audit_default_path())
        self.audit_context: dict = {}
        self._progress = progress
        self.state = SandboxState.STOPPED
        self.backend: Backend | None = None
        self.image: Image | None = None
        self.accel_reason = ""
        #: The VMM's cgroup limits, or "none (why)".
        self.cgroup_note = ""
        self._heartbeat_task: asyncio.Task | None = None
        self.kernel_info: dict = {}
        self.vm_id: str | None = None
        self.started_at: float | None = None
        self.boot_seconds: float | None = None
        self._channel: GuestChannel | None = None
        self._session: Session | None = None
        self._pending: dict[str, Inbox] = {}
        self._lock = threading.RLock()
        self._ready: asyncio.Future | None = None
        self._death: SmolVMError | None = None
        self._registry = Registry()
        self._snapshots = SnapshotCache()
        self.started_from: str | None = None
        self.last_cell_s: float | None = None
        self.transport: str | None = None
        self.backend_name: str | None = None
        self._net = None           # net.VMNetwork while the VM has a NIC
        self._ssh_keys = None      # channel.ssh.SSHKeys while the transport is SSH
        self._link_secret = ""     # the vsock hello's secret (see _setup_network)
        self._hostd: HostClient | None = None   # the admission service's grant, while a VM runs
        self._ssh_client = None
        #: When set, every Jupyter frame from the guest goes here raw (as its
        #: multipart list, not yet verified): the relaying kernel re-signs the
        #: original bytes instead of re-serialising them. Called on the I/O thread.
        self.on_guest_frame: Callable[[Channel, list[bytes]], None] | None = None
        #: Called (on the I/O thread) once when the VM, its agent or kernel dies.
        self.on_death: Callable[[SmolVMError], None] | None = None
        #: When set, notes for the running cell (a limit the guest reached, an
        #: output too large to carry) go here as text instead of into the
        #: execute() queues. Called on the I/O thread.
        self.on_notice: Callable[[str], None] | None = None
        self.guest_key: bytes = b""
        #: The background build of this shape's ready snapshot (snapshot="auto").
        self.snapshot_build: asyncio.Task | None = None
        self._snapshot_wanted: tuple | None = None
        #: Idle pause to disk (pause.py): the last time a message went to or
        #: came from the guest kernel, a hook saying the owner has work in the
        #: VM (the kernel's running cells), and why pausing is off, if it is.
        self.pauser = Pauser(self)
        self.last_active = time.monotonic()
        self.busy: Callable[[], bool] | None = None
        self.pause_note = ""

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Sandbox:
        if self.state in (SandboxState.STOPPED, SandboxState.DEAD):
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Boot the VM and wait until its kernel answers (at most ``boot_timeout``)."""
        with self._lock:
            if self.state in _USABLE:
                return
            _live.add(self)
            aio.run(self._start())

    def stop(self) -> None:
        """Destroy the VM and remove its files, and end a background snapshot
        build of this Sandbox; safe to call twice."""
        with self._lock:
            aio.run(self._stop())
            build, self.snapshot_build = self.snapshot_build, None
            if build is not None and not build.done():
                aio.loop().call_soon_threadsafe(build.cancel)

    def wait_for_snapshot(self, timeout: float = 300.0) -> bool:
        """Wait for a background snapshot build (see ``snapshot``); whether one is ready now."""
        build = self.snapshot_build
        if build is None:
            return False

        async def wait() -> bool:
            try:
                return bool(await asyncio.wait_for(asyncio.shield(build), timeout))
            except (asyncio.TimeoutError, asyncio.CancelledError):
                return False
        return aio.run(wait(), timeout + 5)

    def reset(self) -> None:
        """Replace the VM with a fresh one (same settings); all guest state is lost."""
        with self._lock:
            _live.add(self)
            aio.run(self._stop())
            aio.run(self._start())

    def record_audit(self, event: str, **fields) -> None:
        """An audit event: through the admission service when one holds this VM's
        grant (it writes the host's log with the uid it sees), else to the log."""
        if self._hostd is not None:
            self._hostd.event(event, **fields)
        else:
            self.audit.record(event, **fields)

    def _say(self, msg: str) -> None:
        log.info(msg)
        if self._progress:
            self._progress(msg)

    async def _start(self) -> None:
        from smolvm_kernel.backends.accel import choose_accel, host_tsc_khz
        from smolvm_kernel.backends.qemu import QemuBackend, find_qemu

        cfg = self.config
        t0 = time.monotonic()
        timeline.mark("VM start begins")
        self.state = SandboxState.BOOTING
        self._snapshot_wanted = None
        self._death = None
        try:
            await asyncio.to_thread(self._registry.cleanup)
            pol = cfg.policy
            if pol is not None and pol.hostd:
                # The host's quotas and budget: a grant held for this VM's life (hostd.py).
                self._hostd = await asyncio.to_thread(HostClient, pol.hostd)
                await asyncio.to_thread(self._hostd.admit, cfg.vcpus, cfg.mem_mib,
                                        str(self.audit_context.get("kernel_id", "")),
                                        cfg.disk_mib, cfg.profile, cfg.network)
            cache = ImageCache()
            if cfg.auto_build:
                self.image = await asyncio.to_thread(cache.ensure, cfg.profile, self._progress)
            else:
                self.image = cache.get(cfg.profile)
            backend_name = self.backend_name = self._pick_backend()
            if backend_name == "firecracker":
                from smolvm_kernel.backends.firecracker import FirecrackerBackend
                backend_cls, binary, accel, self.accel_reason = (
                    FirecrackerBackend, cfg.firecracker_path, "kvm", "Firecracker requires KVM")
            else:
                binary = find_qemu(cfg.qemu_path)
                choice = await asyncio.to_thread(choose_accel, cfg.accel, binary, self.image)
                backend_cls, accel, self.accel_reason = QemuBackend, choice.name, choice.reason
            shape = {"vcpus": cfg.vcpus, "mem_mib": cfg.mem_mib, "disk_mib": cfg.disk_mib,
                     "accel": accel, "debug_console": cfg.debug_console,
                     "tsc_khz": host_tsc_khz() if accel == "tcg" else None}
            self.transport = pick_transport(cfg, backend_name)
            snap = None
            if self.transport != "serial" or cfg.network != "none":
                # A NIC, SSH keys or a vsock CID belong to one VM: such VMs
                # boot cold (their seed is made per VM).
                if cfg.snapshot != "off":
                    self._say(f"no ready snapshot with network={cfg.network}, transport={self.transport}; "
                              f"cold boot")
            elif backend_cls is QemuBackend and cfg.snapshot != "off":
                snap = await self._ready_snapshot(binary, shape)
            elif cfg.snapshot != "off":
                # The backend can save and load (backends/firecracker.py), but a
                # Firecracker snapshot reopens the template's disk paths, so
                # concurrent forks need the jailer's per-VM chroot first.
                self._say("ready snapshots are not used with Firecracker yet (forks need the "
                          "jailer for per-VM disk paths); cold boot")
            if snap is not None:
                try:
                    await self._launch(backend_cls, binary, shape, restore=snap)
                    self.started_from = "snapshot"
                except SmolVMError as exc:
                    # A snapshot that does not restore is rebuilt next time;
                    # this start falls back to a cold boot.
                    self._say(f"snapshot restore failed ({exc.__class__.__name__}); cold boot instead")
                    log.warning("snapshot restore failed, cold boot instead: %s", exc)
                    # The grant stays: the cold boot is the same VM's start (giving
                    # it back here let a failed restore boot with no grant at all).
                    await self._stop(keep_grant=True)
                    self.state = SandboxState.BOOTING
                    self._death = None
                    self._snapshots.drop(snap, str(exc).splitlines()[0])
                    snap = None
            if snap is None:
                await self._launch(backend_cls, binary, shape, restore=None)
                self.started_from = "cold boot"
            self.boot_seconds = time.monotonic() - t0
            self.state = SandboxState.READY
            self._say(f"microVM ready in {self.boot_seconds:.1f} s ({self.started_from})")
            cfg = self.config
            self.record_audit("start", vm_id=self.vm_id, **self.audit_context, profile=cfg.profile,
                              vcpus=cfg.vcpus, mem_mib=cfg.mem_mib, disk_mib=cfg.disk_mib,
                              network=cfg.network, transport=self.transport, backend=self.backend.name,
                              accel=self.backend.spec.accel, boot_s=round(self.boot_seconds, 3),
                              started_from=self.started_from)
            if self._snapshot_wanted is not None and (self.snapshot_build is None or self.snapshot_build.done()):
                # After this VM is up, so that the two do not share the CPU while it boots.
                self.snapshot_build = asyncio.get_running_loop().create_task(
                    self._build_background_snapshot(*self._snapshot_wanted))
            self._snapshot_wanted = None
            self.last_active = time.monotonic()
            self._start_heartbeat()
        except BaseException:
            await self._stop()
            raise

    async def _launch(self, backend_cls, binary: str, shape: dict, restore) -> None:
        cfg = self.config
        self.vm_id = uuid.uuid4().hex[:12]
        owner_pid, owner_start = this_process()
        run_dir = self._registry.new_run_dir(self.vm_id)
        self._registry.add(VMRecord(
            vm_id=self.vm_id, backend=backend_cls.name, accel=shape["accel"], profile=cfg.profile,
            run_dir=str(run_dir), owner_pid=owner_pid, owner_start=owner_start,
            vcpus=cfg.vcpus, mem_mib=cfg.mem_mib))
        spec = VMSpec(vm_id=self.vm_id, run_dir=run_dir, image=self.image, transport=self.transport,
                      ram_file=restore.ram if restore else None, **shape)
        spec.cgroup = await asyncio.to_thread(self._make_cgroup, spec)
        if restore is None:
            await self._setup_network(spec)
        self.backend = backend_cls(spec, binary, restore=restore) if restore else backend_cls(spec, binary)
        verb = "restoring microVM from its ready snapshot" if restore else "starting microVM"
        self._say(f"{verb} ({backend_cls.name}/{shape['accel']})")
        try:
            timeline.mark("VMM launch begins")
            await self.backend.launch()
            timeline.mark("VMM running (state loaded)")
        finally:
            if spec.tap_fd is not None:
                os.close(spec.tap_fd)     # QEMU has its own copy now
        self._registry.set_vmm(self.vm_id, self.backend.pid)
        self.started_at = time.time()
        # A restore answers in about a second; do not wait a whole cold-boot
        # timeout before falling back.
        await self._connect(time.monotonic(), min(cfg.boot_timeout, 30.0) if restore else None)

    def _make_cgroup(self, spec: VMSpec):
        """The VMM's cgroup with limits from the VM's shape, or None (and why, in
        the status). Under an admission service the one it made for the grant."""
        if self._hostd is not None and self._hostd.cgroup is not None:
            group = self._hostd.cgroup
            self.cgroup_note = f"{group.limits.describe()} (cgroup v{group.version}, made by hostd)"
            return group
        limits = cgroups.Limits.for_shape(spec.mem_mib, spec.vcpus, self.config.vmm_overhead_mib,
                                          self.config.cpu_limit)
        group = cgroups.create(spec.vm_id, limits)
        if isinstance(group, str):
            self.cgroup_note = f"none ({group})"
            return None
        self.cgroup_note = f"{limits.describe()} (cgroup v{group.version})"
        return group

    async def _setup_network(self, spec: VMSpec) -> None:
        """TAP, rules, lease and the seed disk (address, SSH keys) for this VM,
        recorded in ``spec`` (the caller closes ``spec.tap_fd`` once the VMM has it)."""
        cfg = self.config
        seed: dict = {}
        if cfg.network != "none":
            from smolvm_kernel.host.net import LeaseBook, VMNetwork

            if self.backend_name == "firecracker" and cfg.netns:
                raise ConfigError("netns", cfg.netns, "Firecracker opens its TAP by name in its own "
                                  "namespace; use netns='' with Firecracker")
            self._net = VMNetwork(LeaseBook(self._registry.db_path), spec.vm_id, pool=cfg.net_pool,
                                  netns=cfg.netns, allow=cfg.egress_allow, dns=cfg.dns,
                                  max_connections=cfg.net_max_connections,
                                  connection_rate=cfg.net_connection_rate)
            for note in self._net.dns_notes:
                self._say(f"DNS: {note}")
            self._say(f"network: TAP and nftables rules for {spec.vm_id}")
            spec.tap_fd = await asyncio.to_thread(self._net.setup, self.backend_name != "firecracker")
            spec.tap_name = self._net.lease.tap
            spec.mac = self._net.lease.mac
            seed["net"] = self._net.guest_config()
        if self.transport == "ssh":
            from smolvm_kernel.channel.ssh import SSHKeys

            self._ssh_keys = await asyncio.to_thread(SSHKeys.generate)
            seed["ssh"] = self._ssh_keys.seed()
        if self.transport == "vsock":
            # Any host user can connect to a guest's vsock port: the agent
            # answers only the hello that carries this (guest/seed.py).
            self._link_secret = secrets.token_hex(32)
            seed["link_secret"] = self._link_secret
        if seed:
            from smolvm_kernel.backends.base import write_seed

            spec.seed = spec.run_dir / "seed.img"
            write_seed(spec.seed, {"smolvm_seed": 1, **seed})
        if self.transport == "vsock" and spec.vsock_cid is None:
            spec.vsock_cid = 3 + secrets.randbelow(2**31)

    async def _ready_snapshot(self, binary: str, shape: dict):
        """The snapshot for this shape, built first (once, under a lock) if missing."""
        from smolvm_kernel.vm.snapshot import qemu_identity, snapshot_key

        key = snapshot_key(self.image, "qemu", shape["accel"], shape["vcpus"], shape["mem_mib"],
                           shape["disk_mib"], qemu_identity(binary), shape["tsc_khz"])
        snaps = self._snapshots
        snap = snaps.get(self.image, key)
        if snap is not None or shape["debug_console"]:
            return snap
        if self.config.snapshot == "auto":
            self._snapshot_wanted = (binary, shape, key)
            self._say(f"first start of {shape['vcpus']} vCPU / {shape['mem_mib']} MiB: a cold boot now; its "
                      f"ready snapshot is built in the background, and later starts take under a second")
            return None
        took = [m.get("boot_s", 0) + m.get("save_s", 0) for m in
                (other.manifest() for other in snaps.list()) if m.get("profile") == self.image.profile]
        estimate = f"about {max(took):.0f} s" if took else "under a minute"
        snap = await self._build_snapshot(
            binary, shape, key, wait=True, say=self._say,
            announce=f"first start of {shape['vcpus']} vCPU / {shape['mem_mib']} MiB: building its ready "
                     f"snapshot ({estimate}, once; later starts take under a second)")
        if snap is None:
            self._say("cold boot instead; the next start tries the snapshot again")
        return snap

    async def _build_background_snapshot(self, binary: str, shape: dict, key: str) -> bool:
        """Build this shape's snapshot unless another process is at it; whether one is ready."""
        return await self._build_snapshot(binary, shape, key, wait=False, say=log.info) is not None

    async def _build_snapshot(self, binary: str, shape: dict, key: str, *, wait: bool,
                              say: Callable[[str], None], announce: str = ""):
        """The shape's snapshot, built under its lock unless it exists by then; None if
        the build failed, or (``wait=False``) another process holds the lock."""
        snaps, image = self._snapshots, self.image
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
                snap = await snaps.build(image, key, shape, binary, self.config.boot_timeout)
            except (SmolVMError, OSError, asyncio.TimeoutError) as exc:
                log.warning("building a ready snapshot failed: %s", exc)
                say(f"could not build a snapshot ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''})")
                return None
            say(f"snapshot ready in {time.monotonic() - t:.1f} s")
            return snap
        finally:
            lock.close()

    def _pick_backend(self) -> str:
        wanted = self.config.backend
        if wanted == "qemu":
            return "qemu"
        from smolvm_kernel.backends.firecracker import firecracker_available
        ok, why = firecracker_available(self.config.firecracker_path)
        if wanted == "firecracker" and not ok:
            raise ConfigError("backend", "firecracker", why + "; use backend=auto or qemu")
        return "firecracker" if ok else "qemu"

    def _start_heartbeat(self) -> None:
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat(self.vm_id))

    async def _connect(self, t0: float, timeout: float | None = None, resume: bool = False) -> None:
        """Open the channel and say hello: a new key for a new or restored VM,
        the same key for one resumed from a pause (its kernel is ready)."""
        backend = self.backend
        timeout = timeout or self.config.boot_timeout
        loop = asyncio.get_running_loop()

        def remaining() -> float:
            return max(0.1, timeout - (time.monotonic() - t0))

        try:
            if self.transport == "ssh":
                from smolvm_kernel.channel import ssh

                reader, writer, self._ssh_client = await ssh.open_channel(
                    self._net.lease.guest_ip, self._ssh_keys, netns=self.config.netns,
                    timeout=remaining(), alive=lambda: backend.poll() is None)
            else:
                reader, writer = await backend.open_channel(remaining())
            timeline.mark("channel open")
        except ConnectionError as exc:
            if isinstance(exc, SmolVMError):    # a pinned host key that does not match
                raise
            raise self._boot_failure("the guest channel", timeout) from None
        self._ready = loop.create_future()
        self._channel = GuestChannel(reader, writer, self._on_frame, self._on_channel_close,
                                     max_frame=self.config.max_message_bytes + 64 * 1024)
        if resume:
            key = self.guest_key.decode()
        else:
            key = secrets.token_hex(32)
            self.guest_key = key.encode()
            self._session = Session(key=self.guest_key, username="smolvm")
        watcher = asyncio.create_task(backend.wait())
        try:
            handshake = asyncio.create_task(self._channel.handshake(
                {"key": key, "max_frame": self.config.max_message_bytes,
                 **({"secret": self._link_secret} if self._link_secret else {})}, remaining()))
            done, _ = await asyncio.wait({handshake, watcher}, timeout=remaining(),
                                         return_when=asyncio.FIRST_COMPLETED)
            if handshake not in done:
                handshake.cancel()
                raise self._boot_failure("the guest agent", timeout)
            try:
                hello = handshake.result()
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                # The guest went away mid-handshake: usually the VM is ending;
                # let its exit be seen so the error carries the console.
                await asyncio.wait({watcher}, timeout=1.0)
                raise self._boot_failure("the guest agent", timeout) from None
            timeline.mark("hello answered")
            self._channel.start()
            if not (resume and hello.get("kernel_ready") is True):
                done, _ = await asyncio.wait({self._ready, watcher}, timeout=remaining(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if self._ready not in done:
                    raise self._boot_failure("a ready guest kernel", timeout)
                self.kernel_info = self._ready.result()
        except BaseException:
            watcher.cancel()
            raise
        vm_id = self.vm_id
        watcher.add_done_callback(lambda task: self._on_vm_exit(task, vm_id))

    def _boot_failure(self, stage: str, timeout: float) -> SmolVMError:
        backend = self.backend
        code = backend.poll() if backend else None
        if self._death is not None:
            return self._death
        if code is not None:
            return self._over_host_limit() or GuestDied(f"the VMM exited with status {code} while booting",
                             backend.vmm_log_tail() + "\n--- guest console (tail) ---\n"
                             + backend.console_tail())
        return BootTimeout(timeout, stage, backend.console_tail() if backend else "")

    async def _heartbeat(self, vm_id: str) -> None:
        """A VMM can hang while its process runs (a deadlock, a guest stuck in its
        kernel, vCPUs stopped through the monitor): the guest then just goes
        silent. After HEARTBEAT_IDLE_S of silence the agent is pinged; no answer
        within HEARTBEAT_TIMEOUT_S means the VM is gone: it is reported and its
        VMM killed."""
        loop = asyncio.get_running_loop()
        while vm_id == self.vm_id and self.state in (SandboxState.READY, SandboxState.BUSY):
            await asyncio.sleep(1.0)
            chan = self._channel
            if chan is None or vm_id != self.vm_id:
                return
            if self.pauser.maybe_pause() is not None:
                return      # the resume starts a new heartbeat
            if self.backend is not None:
                try:
                    self.backend.cap_logs()
                except OSError as exc:
                    log.warning("cannot cut the VM's logs: %s", exc)
            if chan.paused or loop.time() - chan.last_heard < HEARTBEAT_IDLE_S:
                continue      # paused: the host is behind, the guest is not silent
            try:
                await chan.request("ping", timeout=HEARTBEAT_TIMEOUT_S)
            except (asyncio.TimeoutError, TimeoutError):
                if vm_id != self.vm_id or loop.time() - chan.last_heard < HEARTBEAT_TIMEOUT_S:
                    continue
                self._die(GuestDied(
                    f"the microVM stopped responding: its agent answered no heartbeat for "
                    f"{HEARTBEAT_TIMEOUT_S:g} s (a hung VMM, or a guest stuck in its kernel)",
                    "the VM was destroyed; a fresh one starts on the next cell (reset() with the Python API)"),
                    vm_id)
                if self.backend is not None:
                    self.backend.send_signal(signal.SIGKILL)
                return
            except Exception:   # the channel closed: that path reports the death
                return

    async def _stop(self, keep_grant: bool = False) -> None:
        """Stop the VM and free what it held; ``keep_grant`` keeps the host's
        admission grant (and its cgroup) for a start that goes on (a cold boot
        after a failed restore)."""
        self.pauser.forget()
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
        chan, backend, vm_id = self._channel, self.backend, self.vm_id
        self._channel = None
        self.vm_id = None  # from here on, news from this VM is stale (see _die)
        if chan is not None:
            await chan.close()
        if backend is not None:
            await backend.terminate(grace=1.0)
            await backend.kill()
            await backend.cleanup()
        client, self._ssh_client = self._ssh_client, None
        if client is not None:
            client.close()
        net, self._net = self._net, None
        if net is not None:
            await asyncio.to_thread(net.teardown)
        self._ssh_keys = None
        self._link_secret = ""
        if vm_id is not None:
            await asyncio.to_thread(self._registry.remove, vm_id)
            self.record_audit("stop", vm_id=vm_id, **self.audit_context,
                              ran_s=round(time.time() - self.started_at, 1) if self.started_at else None)
        self.backend = None
        self.vm_id = None
        self.state = SandboxState.STOPPED
        if not keep_grant:
            hostd, self._hostd = self._hostd, None
            if hostd is not None:
                hostd.close()      # the grant goes back, after the stop is on record
        self._fail_pending(SandboxStopped())

    # ------------------------------------------------------------ guest events

    def _on_vm_exit(self, task: asyncio.Task, vm_id: str | None) -> None:
        if task.cancelled() or self.backend is None or self.pauser.paused:
            return      # a paused VM's VMM ends on purpose
        code = task.result()
        console = self.backend.console_tail(16000)   # a panic's line comes before its stack dump
        self._die(self._over_host_limit() or GuestDied(
            f"the microVM exited (status {code}){guest_news.console_cause(console)}",
            "--- guest console (tail) ---\n" + console[-2000:]), vm_id)

    def _over_host_limit(self) -> GuestDied | None:
        """The VMM's death, if its cgroup's memory limit caused it."""
        group = self.backend.spec.cgroup if self.backend else None
        if group is None or not group.oom_kills():
            return None
        return GuestDied(
            f"the microVM's VMM went over its host memory limit of {group.limits.memory_bytes // 2**20} MiB "
            f"(the VM's {self.backend.spec.mem_mib} MiB plus vmm_overhead_mib={self.config.vmm_overhead_mib}) "
            f"and the host stopped it", "raise vmm_overhead_mib if the VMM needs more (QEMU under TCG "
            "uses about 130 MiB beyond the guest's RAM)")

    def _on_channel_close(self, error: BaseException | None) -> None:
        if self.backend is None or self.state == SandboxState.STOPPED or self.pauser.paused:
            return
        if isinstance(error, ProtocolError):
            # Not a Jupyter guest any more (root in the VM writing to the channel):
            # nothing more it says is read, and its VMM goes now.
            self._die(GuestDied(f"the microVM was stopped: {error}",
                                "a fresh one starts on the next cell (reset() with the Python API)"),
                      self.vm_id)
            self.backend.send_signal(signal.SIGKILL)
            return
        died = GuestDied("the channel to the guest agent closed", f"{error or 'end of stream'}")
        # The stream usually ends because the VMM died; give its exit a moment
        # to be seen so the cell reports that, the more useful cause.
        asyncio.get_running_loop().call_later(0.5, self._die, died, self.vm_id)

    def _die(self, error: SmolVMError, vm_id: str | None = None) -> None:
        if vm_id is not None and vm_id != self.vm_id:
            return  # news about a VM this sandbox already replaced
        self.pauser.forget()
        if self._death is None:
            self._death = error
            self.record_audit("death", vm_id=self.vm_id, **self.audit_context,
                              cause=str(error).splitlines()[0] if str(error) else type(error).__name__)
        if self.state != SandboxState.STOPPED:
            self.state = SandboxState.DEAD
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        self._fail_pending(error)
        if self.on_death is not None and self._death is error:
            self.on_death(error)

    def _fail_pending(self, error: SmolVMError) -> None:
        for q in list(self._pending.values()):
            q.put(_Died(error))

    def _on_frame(self, chan: Channel, body: bytes) -> None:
        """One frame from the (untrusted) guest; whatever it holds, this never raises."""
        try:
            self._handle_frame(chan, body)
        except Exception as exc:   # a malformed frame must not end the read loop
            log.warning("dropped a %s frame from the guest: %s: %s", chan.name, type(exc).__name__, exc)

    def _handle_frame(self, chan: Channel, body: bytes) -> None:
        if chan == Channel.AGENT:
            self._on_agent_event(wire.decode_json(body))
            return
        self.last_active = time.monotonic()
        if self.on_guest_frame is not None:
            try:
                self.on_guest_frame(chan, wire.unpack_parts(body))
            except wire.FrameError as exc:
                log.warning("dropped a malformed %s frame from the guest: %s", chan.name, exc)
            return
        try:
            parts = wire.unpack_parts(body)
            _, msg_list = self._session.feed_identities(parts, copy=True)
            msg = self._session.deserialize(msg_list, content=True, copy=True)
        except (wire.FrameError, ValueError, KeyError, TypeError, RecursionError) as exc:
            # A guest that signs wrongly or sends garbage gets its message dropped.
            log.warning("dropped an invalid %s message from the guest: %s", chan.name, exc)
            return
        parent, header, content = msg.get("parent_header"), msg.get("header"), msg.get("content")
        if not (isinstance(parent, dict) and isinstance(header, dict) and isinstance(content, dict)
                and isinstance(msg.get("msg_type"), str)):
            log.warning("dropped a malformed %s message from the guest", chan.name)
            return
        msg["channel"] = chan.name.lower()
        parent_id = parent.get("msg_id")
        inbox = self._pending.get(parent_id) if isinstance(parent_id, str) else None
        if inbox is not None:
            inbox.offer(msg, len(body))

    def _on_agent_event(self, event: dict) -> None:
        news = guest_news.agent_event(event, self.config.mem_mib, self.config.max_message_bytes)
        if news is None:
            log.warning("unknown or malformed agent event %r", str(event.get("event"))[:80])
        elif news.ready is not None:
            timeline.mark("guest kernel ready (event in)")
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(news.ready)
        elif news.death is not None:
            self._die(news.death)
        elif news.note is not None:
            self._notice(news.note)

    def _notice(self, text: str) -> None:
        """A note for the running cell(s), from the host (never guest text)."""
        if self.on_notice is not None:
            self.on_notice(text)
            return
        note = {"msg_type": "stream", "channel": "iopub", "content": {"name": "stderr", "text": text}}
        for q in list(self._pending.values()):
            q.put(note)

    # ------------------------------------------------------------ messaging

    def _require_running(self) -> bool:
        """Raise unless the VM can be used; a paused one is resumed first (True then)."""
        if self.state == SandboxState.PAUSED:
            return self._wake()
        if self.state == SandboxState.DEAD:
            raise self._death or GuestDied("the microVM is gone")
        if self.state not in (SandboxState.READY, SandboxState.BUSY) or self._channel is None:
            raise SandboxStopped()
        return False

    def _wake(self) -> bool:
        """Resume a paused VM and wait for it (any thread but the loop's)."""
        async def wake() -> None:
            task = self.pauser.wake()
            if task is not None:
                await asyncio.shield(task)
        aio.run(wake(), self.config.boot_timeout + 60)
        if self.state not in (SandboxState.READY, SandboxState.BUSY):
            raise self._death or SandboxStopped()
        return True

    def _send(self, chan: Channel, body: bytes) -> None:
        """On the loop: to the guest, or held while the VM is paused."""
        self.last_active = time.monotonic()
        if self.pauser.hold(chan, body):
            return
        channel = self._channel
        if channel is not None:
            channel.send(chan, body)

    def send_message(self, chan: Channel, msg: dict) -> None:
        """Sign ``msg`` with the guest key and queue it for the guest kernel."""
        parts = self._session.serialize(msg)
        aio.loop().call_soon_threadsafe(self._send, chan, wire.pack_parts(parts))

    def pause_reading(self, pause: bool) -> None:
        """Stop (or go on) reading the guest's frames (any thread): the consumer
        of on_guest_frame is behind and holds too many bytes (see kernel.py)."""
        channel = self._channel
        if channel is not None:
            aio.loop().call_soon_threadsafe(channel.pause_reading if pause else channel.resume_reading)

    def send_raw(self, chan: Channel, parts: list[bytes]) -> None:
        """Queue already-signed multipart frames for the guest kernel (any thread)."""
        if self.state not in _USABLE or (self._channel is None and self.state != SandboxState.PAUSED):
            raise self._death or SandboxStopped()
        aio.loop().call_soon_threadsafe(self._send, chan, wire.pack_parts(parts))

    def agent_request(self, op: str, timeout: float = 10.0, **fields) -> dict:
        """Run one agent op and return its reply, raising on errors."""
        self._require_running()
        self.last_active = time.monotonic()
        try:
            reply = aio.run(self._channel.request(op, timeout=timeout, **fields), timeout + 1)
        except (asyncio.TimeoutError, TimeoutError):
            raise GuestDied(f"the guest agent did not answer {op!r} within {timeout:g} s") from None
        if not reply.get("ok"):
            raise GuestFileError(reply.get("error", "error")) if op in ("put", "get") \
                else ProtocolError(f"the guest agent failed {op!r}: {reply.get('error')}")
        return reply

    def execute(self, code: str, *, timeout: float | None = None,
                stdin: Callable[[str, bool], str] | None = None,
                silent: bool = False, store_history: bool = True) -> Iterator[Output]:
        """Run ``code`` in the guest kernel and yield its outputs as they arrive.

        ``timeout`` (seconds; default ``config.exec_timeout``, 0 = none) interrupts a
        run that takes longer and raises :class:`ExecutionTimeout`. ``stdin`` answers
        ``input()``/``getpass()``: it gets the prompt and whether it is a password.

        The outputs are the guest's and untrusted: before a browser renders one
        (HTML, SVG, JavaScript, ...), pass it through
        :func:`smolvm_kernel.safe_output`, which applies the safe output policy.
        """
        resumed = self._require_running()
        limit = self.config.exec_timeout if timeout is None else timeout
        msg = self._session.msg("execute_request", content={
            "code": code, "silent": silent, "store_history": store_history,
            "user_expressions": {}, "allow_stdin": stdin is not None, "stop_on_error": True})
        msg_id = msg["header"]["msg_id"]
        q = Inbox(self.config.max_output_mib * 2**20)
        self._pending[msg_id] = q
        self.state = SandboxState.BUSY
        started = time.monotonic()
        got_reply = got_idle = False
        deadline = time.monotonic() + limit if limit else None
        try:
            if resumed:     # the note the kernel's cells get (pause.py), before this cell's outputs
                yield Output("stream", {"name": "stderr", "text": self.pauser.resume_note()})
            self.send_message(Channel.SHELL, msg)
            while not (got_reply and got_idle):
                wait = None if deadline is None else deadline - time.monotonic()
                try:
                    if wait is not None and wait <= 0:
                        raise queue.Empty
                    item = q.get(timeout=wait)
                except queue.Empty:
                    self._on_timeout(q, limit)
                if isinstance(item, _Died):
                    raise item.error
                mtype = item["msg_type"]
                if item["channel"] == "shell":
                    got_reply = mtype == "execute_reply"
                elif item["channel"] == "stdin" and mtype == "input_request":
                    self._answer_input(item, stdin)
                elif mtype == "status":
                    got_idle = item["content"].get("execution_state") == "idle"
                elif mtype in ("stream", "display_data", "update_display_data", "execute_result",
                               "error", "clear_output"):
                    yield Output(mtype, item["content"])
        finally:
            self._pending.pop(msg_id, None)
            self.last_cell_s = time.monotonic() - started
            if self.state == SandboxState.BUSY:
                self.state = SandboxState.READY

    def _on_timeout(self, q: Inbox, limit: float) -> None:
        """Interrupt; if the guest does not come back idle, reset the VM. Always raises."""
        try:
            self.interrupt()
            deadline = time.monotonic() + INTERRUPT_GRACE_S
            reply = idle = False
            while not (reply and idle) and time.monotonic() < deadline:
                item = q.get(timeout=max(0.01, deadline - time.monotonic()))
                if isinstance(item, _Died):
                    break
                reply = reply or item.get("msg_type") == "execute_reply"
                idle = idle or (item.get("msg_type") == "status" and
                                item["content"].get("execution_state") == "idle")
            if reply and idle:
                raise ExecutionTimeout(limit, reset=False)
        except (queue.Empty, SmolVMError) as exc:
            if isinstance(exc, ExecutionTimeout):
                raise
        self.reset()
        raise ExecutionTimeout(limit, reset=True)

    def _answer_input(self, request: dict, stdin: Callable[[str, bool], str] | None) -> None:
        content = request["content"]
        try:
            value = stdin(content.get("prompt", ""), bool(content.get("password"))) if stdin else ""
        except (EOFError, KeyboardInterrupt):
            value = ""
        reply = self._session.msg("input_reply", content={"value": value},
                                  parent=request["header"])
        self.send_message(Channel.STDIN, reply)

    def request(self, msg_type: str, content: dict, channel: Channel = Channel.SHELL,
                timeout: float = 30.0) -> dict:
        """Send one shell/control request and return its reply message."""
        self._require_running()
        msg = self._session.msg(msg_type, content=content)
        q = Inbox(self.config.max_output_mib * 2**20)
        self._pending[msg["header"]["msg_id"]] = q
        try:
            self.send_message(channel, msg)
            deadline = time.monotonic() + timeout
            while True:
                item = q.get(timeout=max(0.01, deadline - time.monotonic()))
                if isinstance(item, _Died):
                    raise item.error
                if item["channel"] == channel.name.lower() and item["msg_type"].endswith("_reply"):
                    return item
        except queue.Empty:
            raise GuestDied(f"the guest kernel did not answer {msg_type} within {timeout:g} s") from None
        finally:
            self._pending.pop(msg["header"]["msg_id"], None)

    # ------------------------------------------------------------ controls

    def interrupt(self) -> None:
        """Interrupt the running cell (SIGINT to the guest kernel)."""
        if self.state == SandboxState.PAUSED:
            return      # nothing runs in a paused VM
        self.agent_request("interrupt", timeout=5.0)

    def stats(self) -> dict:
        """Guest and host figures: vCPUs, memory, CPU %, disk, uptime, backend, accelerator."""
        host = {
            "state": self.state.value, "vm_id": self.vm_id,
            "backend": self.backend.name if self.backend else None,
            "accel": self.backend.spec.accel if self.backend else None,
            "accel_reason": self.accel_reason, "transport": self.transport if self.backend else None,
            "network": self.config.network, "profile": self.config.profile,
            "guest_ip": self._net.lease.guest_ip if self._net and self._net.lease else None,
            "configured_vcpus": self.config.vcpus, "configured_mem_mib": self.config.mem_mib,
            "vmm_pid": self.backend.pid if self.backend else None,
            "vmm_rss_kib": rss_kib(self.backend.pid) if self.backend and not self.pauser.paused else None,
            "cgroup": self.cgroup_note if self.backend else None,
            "boot_seconds": self.boot_seconds, "started_from": self.started_from,
            # The guest's own uptime includes the snapshot template's; this is ours.
            "vm_uptime_s": time.time() - self.started_at if self.started_at and self.backend else None,
            "last_cell_s": self.last_cell_s,
            "pause_after_s": self.config.pause_after or None, "pause_note": self.pause_note or None,
            "paused_state_bytes": self.pauser.state_bytes if self.pauser.paused else None,
            "last_pause_s": self.pauser.last_pause_s, "last_resume_s": self.pauser.last_resume_s,
        }
        if self.state not in (SandboxState.READY, SandboxState.BUSY):
            return host
        guest = self.agent_request("stats")
        # The guest's word, for the guest's own figures only: numbers under
        # known names, never a host field (backend, accel, pids, state ...).
        return {**host, **guest_news.guest_figures(guest)}

    def can_resize_live(self, mem_mib: int) -> bool:
        """Whether ``mem_mib`` can be set on the running VM (balloon, up to its boot size)."""
        return (self.state in (SandboxState.READY, SandboxState.BUSY) and self.backend is not None
                and hasattr(self.backend, "set_memory") and mem_mib <= self.backend.spec.mem_mib)

    def set_memory(self, mem_mib: int) -> int:
        """Change the running VM's memory through its balloon, keeping its state.

        Only down from, or back up to, the size it booted with; returns the
        guest's memory afterwards in MiB. The setting is kept for the next start.
        """
        if not self.can_resize_live(mem_mib):
            raise ConfigError("mem_mib", mem_mib, "a running VM's memory can change live only up to the "
                                                  "size it booted with; larger needs a restart")
        self.config = self.config.changed(mem_mib=mem_mib)
        return self.backend.set_memory(mem_mib)

    def put_file(self, data: bytes | str | os.PathLike, remote: str) -> int:
        """Write ``data`` (bytes, or a local path) to ``remote`` under the guest's home."""
        if not isinstance(data, bytes):
            data = Path(data).read_bytes()
        offset = 0
        while True:
            chunk = data[offset:offset + _FILE_CHUNK]
            # The file appears in the guest whole, once all ``size`` bytes are in.
            self.agent_request("put", path=remote, offset=offset, size=len(data),
                               data=base64.b64encode(chunk).decode(), timeout=60)
            offset += len(chunk)
            if offset >= len(data):
                self.record_audit("push", vm_id=self.vm_id, **self.audit_context, path=remote, bytes=offset)
                return offset

    def get_file(self, remote: str, max_bytes: int = 256 * 1024 * 1024) -> bytes:
        """Read ``remote`` (relative to the guest's home, or under /tmp) from the guest."""
        out = bytearray()
        while True:
            reply = self.agent_request("get", path=remote, offset=len(out), length=_FILE_CHUNK, timeout=60)
            size = int(reply["size"])
            if size > max_bytes:
                raise GuestFileError(f"{remote} is {size} bytes, over the {max_bytes}-byte limit")
            chunk = base64.b64decode(reply["data"])
            out += chunk
            if not chunk or len(out) >= size:
                self.record_audit("pull", vm_id=self.vm_id, **self.audit_context, path=remote, bytes=len(out))
                return bytes(out)

    def __repr__(self) -> str:
        accel = self.backend.spec.accel if self.backend else "-"
        return f"<Sandbox {self.vm_id or '-'} {self.state.value} {accel} {self.config.vcpus}cpu/{self.config.mem_mib}MiB>"


#: The guest kernel's limits (guest/limits.py), by the agent's name for them.
def _merged_config(config: SandboxConfig | None, overrides: dict) -> SandboxConfig:
    if config is None:
        return SandboxConfig(**overrides)
    if not overrides:
        return config
    values = {name: getattr(config, name) for name in config.trait_names()
              if config.trait_metadata(name, "config")}
    return SandboxConfig(**{**values, **overrides})


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
