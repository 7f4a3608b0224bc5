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

The Sandbox is the API and the caller's side of it: the calls waiting for
the guest's answers, the settings, the state a caller sees, the audit. What
the VM is and does lives in its collaborators: the start's choices in
boot.py, the running VM (VMM, channel, heartbeat, deaths, teardown) in
machine.py, the idle pause in pause.py. Why this module is still ~700
lines: it is one public class with ~25 short methods (execute, request,
interrupt, stats, files, memory, lifecycle) that share its state and each
carry the docstring a caller reads; splitting them would spread one API
over several files without taking a concern out.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import dataclasses
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from traitlets import TraitError

from smolvm_guest import wire
from smolvm_guest.wire import Channel
from smolvm_kernel import timeline
from smolvm_kernel.backends.base import Backend
from smolvm_kernel.channel.stream import GuestChannel
from smolvm_kernel.config import SandboxConfig
from smolvm_kernel.errors import (ConfigError, ExecutionTimeout, GuestDied,
                                  GuestFileError, ProtocolError, SandboxStopped, SmolVMError)
from smolvm_kernel.host.admission import HostClient
from smolvm_kernel.host.audit import AuditLog
from smolvm_kernel.host.audit import default_path as audit_default_path
from smolvm_kernel.host.procs import rss_kib
from smolvm_kernel.host.registry import Registry
from smolvm_kernel.images import Image
from smolvm_kernel.vm import aio, boot, checkpoints, guest_news
from smolvm_kernel.vm.checkpoints import Checkpoint, CheckpointError, CheckpointStore
from smolvm_kernel.vm.workdir import Workdir, size_words
from smolvm_kernel.vm.inbox import Inbox
from smolvm_kernel.vm.lifecycle import SandboxState
from smolvm_kernel.vm.machine import Hooks, Machine
from smolvm_kernel.vm.pause import PauseHooks, Pauser, why_not_saveable
from smolvm_kernel.vm.session import Session
from smolvm_kernel.vm.snapshot import SnapshotCache

log = logging.getLogger("smolvm_kernel")

#: After a timeout's interrupt, how long the guest gets to come back idle
#: before the VM is reset. A Python-level interrupt lands in milliseconds;
#: a second allows for a busy TCG guest.
INTERRUPT_GRACE_S = 3.0
_FILE_CHUNK = 1 << 20


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
        #: The running VM (machine.py), from the start of its launch to its stop.
        self.machine: Machine | None = None
        self.image: Image | None = None
        self.backend_name: str | None = None
        self.accel_reason = ""
        #: The VMM's cgroup limits, or "none (why)".
        self.cgroup_note = ""
        self.boot_seconds: float | None = None
        self.started_from: str | None = None
        self.last_cell_s: float | None = None
        self._pending: dict[str, Inbox] = {}
        self._lock = threading.RLock()
        self._registry = Registry()
        self._snapshots = SnapshotCache()
        self._hostd: HostClient | None = None   # the admission service's grant, while a VM runs
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
        #: The background build of this shape's ready snapshot (snapshot="auto").
        self.snapshot_build: asyncio.Task | None = None
        self._death: SmolVMError | None = None
        #: The working folder's copy in the running VM (workdir.py), when config.workdir is set.
        self.workdir: Workdir | None = None
        self._workdir_ready: asyncio.Future | None = None
        self._workdir_push: asyncio.Future | None = None
        #: Lines for the first cell after a start (the working folder's left-out files).
        self.start_notes: list[str] = []
        #: Tests only: the guest agent offers its fault-injection op (guest/faults.py).
        self.guest_faults = False
        #: Idle pause to disk (pause.py). ``busy`` is the owner's hook saying it
        #: has work in the VM (the kernel's running cells).
        self.busy: Callable[[], bool] | None = None
        #: This user's checkpoints (checkpoints.py), within the policy's caps.
        self.checkpoint_store = CheckpointStore.for_policy(pol)
        #: The checkpoint the VM being started comes from (restore, fork), if any.
        self._from_checkpoint: Checkpoint | None = None
        self._saving = False
        self.last_restore_s: float | None = None
        self.pauser = Pauser(PauseHooks(
            machine=lambda: self.machine, state=lambda: self.state, set_state=self._set_state,
            busy=lambda: bool(self._pending) or self._saving or (self.busy is not None and self.busy()),
            pause_after=lambda: self.config.pause_after, network=lambda: self.config.network,
            record=self._record_vm, notice=self._notice))

    # ------------------------------------------------------------ the running VM's figures

    @property
    def backend(self) -> Backend | None:
        return self.machine.backend if self.machine else None

    @property
    def vm_id(self) -> str | None:
        return self.machine.vm_id if self.machine else None

    @property
    def transport(self) -> str | None:
        return self.machine.transport if self.machine else None

    @property
    def started_at(self) -> float | None:
        return self.machine.started_at if self.machine else None

    @property
    def kernel_info(self) -> dict:
        return self.machine.kernel_info if self.machine else {}

    @property
    def guest_key(self) -> bytes:
        """The key the guest kernel signs with (new for each VM; guest code can read it)."""
        return self.machine.guest_key if self.machine else b""

    @property
    def _session(self) -> Session | None:
        return self.machine.session if self.machine else None

    @property
    def last_active(self) -> float:
        return self.pauser.last_active

    @property
    def pause_note(self) -> str:
        return self.pauser.note

    def _channel(self) -> GuestChannel | None:
        return self.machine.channel if self.machine else None

    def _set_state(self, state: SandboxState) -> None:
        self.state = state

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
        build of this Sandbox; safe to call twice. Files the code wrote in the
        working folder are copied back first (read-write)."""
        with self._lock:
            self._finish_workdir()
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
            self._finish_workdir()
            aio.run(self._stop())
            aio.run(self._start())

    def record_audit(self, event: str, **fields) -> None:
        """An audit event: through the admission service when one holds this VM's
        grant (it writes the host's log with the uid it sees), else to the log."""
        if self._hostd is not None:
            self._hostd.event(event, **fields)
        else:
            self.audit.record(event, **fields)

    def _record_vm(self, event: str, **fields) -> None:
        """An audit event about the running VM (its id and the context first)."""
        self.record_audit(event, vm_id=self.vm_id, **self.audit_context, **fields)

    def _say(self, msg: str) -> None:
        log.info(msg)
        if self._progress:
            self._progress(msg)

    async def _start(self, from_checkpoint: Checkpoint | None = None) -> None:
        """The boot (boot.py): admission, then the plan, then one Machine; a
        snapshot that does not restore falls back to a cold boot. With
        ``from_checkpoint``, the VM is that checkpoint's, or none (no fallback)."""
        cfg = self.config
        t0 = time.monotonic()
        timeline.mark("VM start begins")
        self.state = SandboxState.BOOTING
        self._death = None
        try:
            await asyncio.to_thread(self._registry.cleanup)
            self._open_workdir()
            if self._hostd is None:      # a restore keeps the grant of the VM it replaces
                self._hostd = await boot.admit(cfg, str(self.audit_context.get("kernel_id", "")))
            plan = await boot.plan(cfg, self._snapshots, self._say, self._progress, self._hostd,
                                   ready_snapshot=from_checkpoint is None)
            self.image, self.backend_name, self.accel_reason = plan.image, plan.backend_name, plan.accel_reason
            snap = plan.snapshot
            if from_checkpoint is not None:
                await self._launch_checkpoint(plan, from_checkpoint)
            elif snap is not None:
                try:
                    await self._launch(plan, restore=snap)
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
            if snap is None and from_checkpoint is None:
                await self._launch(plan, restore=None)
                self.started_from = "cold boot"
            if self._workdir_push is not None:
                await self._workdir_push        # sent (not all answered): a cell comes after it
            self.boot_seconds = time.monotonic() - t0
            self.state = SandboxState.READY
            self._say(f"microVM ready in {self.boot_seconds:.1f} s ({self.started_from})")
            cfg = self.config
            self._record_vm("start", profile=cfg.profile,
                            vcpus=cfg.vcpus, mem_mib=cfg.mem_mib, disk_mib=cfg.disk_mib,
                            network=cfg.network, transport=self.transport, backend=self.backend.name,
                            accel=self.backend.spec.accel, boot_s=round(self.boot_seconds, 3),
                            started_from=self.started_from)
            if plan.build_later is not None and (self.snapshot_build is None or self.snapshot_build.done()):
                # After this VM is up, so that the two do not share the CPU while it boots.
                self.snapshot_build = asyncio.get_running_loop().create_task(
                    boot.build_snapshot(self._snapshots, plan.image, cfg.boot_timeout, *plan.build_later,
                                        wait=False, say=log.info))
            self.pauser.touch()
            self.machine.start_heartbeat()
        except BaseException:
            await self._stop()
            raise

    async def _launch(self, plan: boot.Plan, restore) -> None:
        def adopt(machine: Machine) -> None:
            machine.faults = self.guest_faults
            self.machine = machine

        hooks = Hooks(frame=self._handle_frame, agent_event=self._on_agent_event, death=self._die,
                      hello=self._start_workdir_push,
                      idle=self.pauser.maybe_pause,
                      running=lambda: self.state in (SandboxState.READY, SandboxState.BUSY),
                      paused=lambda: self.pauser.paused)
        self.cgroup_note = await boot.launch(plan, self.config, restore=restore, registry=self._registry,
                                             hooks=hooks, hostd=self._hostd, adopt=adopt, say=self._say)
        if restore is not None and self.machine.net is not None:
            await self._address(self.machine)

    async def _launch_checkpoint(self, plan: boot.Plan, ck: Checkpoint) -> None:
        """Start this VM from a checkpoint, under its shared lock (a fork's
        materialize does not swap its files meanwhile)."""
        store = self.checkpoint_store
        lock = store.lock(ck.name, shared=True)
        await asyncio.to_thread(lock.__enter__)
        try:
            ck = await asyncio.to_thread(store.open, ck.name)
            checkpoints.check_fits(ck, plan.image, plan.binary, plan.shape)
            load = ck.load()
            self._from_checkpoint = ck
            try:
                await self._launch(plan, restore=load)
            finally:
                self._from_checkpoint = None
        finally:
            lock.__exit__()
        self.started_from = f"checkpoint {ck.name!r}"

    async def _address(self, machine: Machine) -> None:
        """A fork of a NIC shape: its template had no address (and another
        MAC); give the guest this VM's lease before any cell runs."""
        reply = await machine.request("net", timeout=30, net=machine.net.guest_config(),
                                      mac=machine.net.lease.mac)
        if not reply.get("ok"):
            raise ProtocolError(f"the guest could not take its network address: {str(reply.get('error'))[:300]}")

    async def _stop(self, keep_grant: bool = False) -> None:
        """Stop the VM and free what it held; ``keep_grant`` keeps the host's
        admission grant (and its cgroup) for a start that goes on (a cold boot
        after a failed restore)."""
        self.pauser.forget()
        if not keep_grant:        # a start that goes on (a cold boot after a failed restore) keeps it
            workdir, self.workdir = self.workdir, None
            if workdir is not None:
                workdir.close()
        machine, self.machine = self.machine, None   # from here on, news from it is stale (see _die)
        if machine is not None:
            await machine.stop()
            self.record_audit("stop", vm_id=machine.vm_id, **self.audit_context,
                              ran_s=round(time.time() - machine.started_at, 1) if machine.started_at else None)
        self.state = SandboxState.STOPPED
        if not keep_grant:
            hostd, self._hostd = self._hostd, None
            if hostd is not None:
                hostd.close()      # the grant goes back, after the stop is on record
        self._fail_pending(SandboxStopped())

    # ------------------------------------------------------------ guest events

    def _die(self, error: SmolVMError, vm_id: str | None = None) -> None:
        """The Machine's death report: the state, the waiting calls and the owner."""
        if vm_id is not None and vm_id != self.vm_id:
            return  # news about a VM this sandbox already replaced
        self.pauser.forget()
        if self._death is None:
            self._death = error
            self.record_audit("death", vm_id=self.vm_id, **self.audit_context,
                              cause=str(error).splitlines()[0] if str(error) else type(error).__name__)
        if self.state != SandboxState.STOPPED:
            self.state = SandboxState.DEAD
        self._fail_pending(error)
        if self.on_death is not None and self._death is error:
            self.on_death(error)

    def _fail_pending(self, error: SmolVMError) -> None:
        for q in list(self._pending.values()):
            q.put(_Died(error))

    def _handle_frame(self, chan: Channel, body: bytes) -> None:
        """A Jupyter frame from the (untrusted) guest: to the relaying kernel raw,
        or verified and to the call waiting for it (the Machine catches errors)."""
        self.pauser.touch()
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
            if self.machine is not None:
                self.machine.kernel_ready(news.ready)
        elif news.death is not None:
            if self.machine is not None:
                self.machine.die(news.death)
            else:
                self._die(news.death)
        elif news.note is not None:
            self._notice(news.note)
        elif news.workdir is not None:
            if self.workdir is not None:
                self.workdir.changed(*news.workdir)

    def _notice(self, text: str) -> None:
        """A note for the running cell(s), from the host (never guest text)."""
        if self.on_notice is not None:
            self.on_notice(text)
            return
        note = {"msg_type": "stream", "channel": "iopub", "content": {"name": "stderr", "text": text}}
        for q in list(self._pending.values()):
            q.put(note)

    # ------------------------------------------------------------ the working folder

    def _open_workdir(self) -> None:
        """At the start: read the working folder into its copy-in, on a thread,
        while the VM is restored (workdir.py)."""
        cfg = self.config
        self._workdir_push = None
        self.start_notes = []
        old, self.workdir = self.workdir, None
        if old is not None:      # a restore's: the VM it belonged to is gone
            old.close()
        if not cfg.workdir or cfg.workdir_mode == "off":
            return
        try:
            self.workdir = Workdir(cfg.workdir, cfg.workdir_mode, request=self.agent_request,
                                   get_file=lambda path, limit: self._read_guest(path, limit),
                                   notice=self._notice)
        except OSError as exc:
            raise ConfigError("workdir", cfg.workdir, f"it cannot be opened as a folder ({exc.strerror}); "
                                                      f"give an existing folder, or workdir_mode='off'") from None
        self._workdir_ready = asyncio.ensure_future(asyncio.to_thread(self.workdir.prepare))

    def _start_workdir_push(self, machine: Machine) -> None:
        """The agent said hello: send the copy-in now (Hooks.hello), on a task
        the start waits for before the VM is ready."""
        if self.workdir is None:
            return
        if self._from_checkpoint is not None:
            # The home is the checkpoint's: nothing is copied in; what the
            # code writes from now on comes back (read-write).
            if self.workdir.mode == "read-write":
                self._workdir_push = asyncio.ensure_future(machine.request("workdir_watch", timeout=60))
            return
        self._workdir_push = asyncio.ensure_future(self._push_workdir(machine))

    async def _push_workdir(self, machine: Machine) -> None:
        copied = await self._workdir_ready
        if copied.total_bytes >= 1 << 20:     # the boot line says what it waits for
            self._say(f"copying the notebook's folder into the VM ({len(copied.files)} files, "
                      f"{size_words(copied.total_bytes)})")
        window: list[asyncio.Future] = []
        for req in self.workdir.requests:
            fields = dict(req)
            op = fields.pop("op")
            future = asyncio.ensure_future(machine.request(op, timeout=60, **fields))
            future.add_done_callback(self._copied_in)
            window.append(future)
            if len(window) > 2:       # at most two batches on their way
                await asyncio.wait([window.pop(0)])
        self._say(f"working folder {self.workdir.root}: {len(copied.files)} files ({copied.total_bytes} bytes, "
                  f"read in {copied.seconds * 1000:.0f} ms) sent to the VM ({self.config.workdir_mode})")
        if copied.note():
            self.start_notes.append(copied.note())

    def _copied_in(self, future) -> None:
        """A copy-in request's answer: a failure is said in the first cell."""
        if future.cancelled():
            return
        try:
            reply = future.result()
        except Exception as exc:   # the VM went away meanwhile: its death says so
            log.info("copying the working folder in: %s", exc)
            return
        if not reply.get("ok"):
            note = (f"[smolvm] copying the notebook's folder into the VM failed: "
                    f"{str(reply.get('error', 'error'))[:300]}\n")
            if self.state == SandboxState.BOOTING:
                self.start_notes.append(note)
            else:
                self._notice(note)

    def _finish_workdir(self) -> None:
        """Before a stop or reset: the files changed since the last cell, back."""
        if self.workdir is not None and self.state in (SandboxState.READY, SandboxState.BUSY):
            self.workdir.finish()

    def _read_guest(self, remote: str, max_bytes: int) -> bytes:
        """A file from the guest's home or /tmp, at most ``max_bytes`` whatever the
        guest says its size is (get_file; the working folder's write-back, which
        is not audited file by file)."""
        out = bytearray()
        while True:
            reply = self.agent_request("get", path=remote, offset=len(out), length=_FILE_CHUNK, timeout=60)
            size, data = reply.get("size"), reply.get("data")
            if not isinstance(size, int) or isinstance(size, bool) or not isinstance(data, str):
                raise GuestFileError(f"{remote}: a malformed answer from the guest")
            if size > max_bytes:
                raise GuestFileError(f"{remote} is {size} bytes, over the {max_bytes}-byte limit")
            chunk = base64.b64decode(data)
            out += chunk
            if len(out) > max_bytes:
                raise GuestFileError(f"{remote}: over {max_bytes} bytes")
            if not chunk or len(out) >= size:
                return bytes(out)

    # ------------------------------------------------------------ checkpoints (checkpoints.py)

    def checkpoint(self, name: str | None = None, *, after_cell: int | None = None) -> Checkpoint:
        """Save the running VM's whole state (memory, devices, disk) as the
        checkpoint ``name`` (default: ``after_cell``, the guest's execution
        count, else the time); the VM goes on running. A name that exists is
        replaced. Raises CheckpointError with the reason (a VM with a network,
        the policy's caps)."""
        with self._lock:
            self._require_running()
            why = checkpoints.why_not_saved(self.machine, self.config.network)
            if why is not None:
                raise CheckpointError(f"no checkpoint: {why}")
            name = name or (str(after_cell) if after_cell else time.strftime("%Y%m%d-%H%M%S"))
            return aio.run(self._checkpoint(name, after_cell))

    async def _checkpoint(self, name: str, after_cell: int | None) -> Checkpoint:
        machine = self.machine
        spec = machine.backend.spec
        key = boot.shape_key(spec.image, machine.backend.binary,
                             {k: getattr(spec, k) for k in ("vcpus", "mem_mib", "disk_mib", "accel", "tsc_khz", "nic")})
        self._saving = True
        try:
            ck = await checkpoints.take(machine, self.checkpoint_store, name, shape_key=key,
                                        profile=spec.image.profile, after_cell=after_cell)
        finally:
            self._saving = False
            self.pauser.touch()
        if not ck.undo:      # an undo step before every cell is not an event worth a line each
            self._record_vm("checkpoint", name=ck.name, bytes=ck.size, save_s=ck.save_s, after_cell=after_cell)
        return ck

    def restore(self, checkpoint: Checkpoint | str) -> Checkpoint:
        """Replace the VM with a checkpoint's state (this user's, of this VM's
        image and shape): a new VMM loads it, and the guest kernel gets a new
        key and fresh entropy. Files the code wrote in the working folder are
        copied back first; the folder is not rolled back. The seconds it took
        are in ``last_restore_s``."""
        with self._lock:
            ck = self._checkpoint_named(checkpoint)
            aio.run(self._check_fits(ck))       # refused before the running VM is touched
            t0 = time.monotonic()
            _live.add(self)
            self._finish_workdir()
            # The host's grant stays: a classroom's one VM per student is
            # replaced, not given back and asked for again.
            aio.run(self._stop(keep_grant=True))
            aio.run(self._start(from_checkpoint=ck))
            self.last_restore_s = time.monotonic() - t0
            self._record_vm("restore", name=ck.name, restore_s=round(self.last_restore_s, 3))
            return ck

    def fork(self, checkpoint: Checkpoint | str, n: int) -> list[Sandbox]:
        """``n`` new Sandboxes (this one's settings, no working folder), each
        started from the checkpoint's state with keys, entropy, generator seeds
        and clock of its own. They map one copy of its memory (the checkpoint
        is made into a RAM file once, checkpoints.materialize); stop each."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise ConfigError("n", n, "fork between 1 and 64 VMs at a time")
        ck = self._checkpoint_named(checkpoint)
        plan = aio.run(self._check_fits(ck))
        ck = aio.run(checkpoints.materialize(self.checkpoint_store, ck, plan.image, plan.binary, plan.shape))
        config = self.config.changed(workdir="")
        forks = [Sandbox(config) for _ in range(n)]
        for sb in forks:
            sb.audit_context = dict(self.audit_context, forked_from=ck.name)
            _live.add(sb)

        async def start_all() -> list:
            return await asyncio.gather(*(sb._start(from_checkpoint=ck) for sb in forks), return_exceptions=True)
        errors = [e for e in aio.run(start_all()) if isinstance(e, BaseException)]
        if errors:
            for sb in forks:
                sb.stop()
            raise errors[0]
        self._record_vm("fork", name=ck.name, n=n)
        return forks

    def checkpoints(self) -> list[Checkpoint]:
        """This user's checkpoints, oldest first."""
        return self.checkpoint_store.list()

    def remove_checkpoint(self, name: str) -> int:
        """Delete a checkpoint; the bytes freed (a fork running from it keeps its memory)."""
        freed = self.checkpoint_store.remove(name)
        self.record_audit("checkpoint_rm", **self.audit_context, name=name, bytes=freed)
        return freed

    def _checkpoint_named(self, checkpoint: Checkpoint | str) -> Checkpoint:
        return self.checkpoint_store.open(checkpoint.name if isinstance(checkpoint, Checkpoint) else checkpoint)

    async def _check_fits(self, ck: Checkpoint) -> boot.Plan:
        plan = await boot.plan(self.config, self._snapshots, log.info, None, None, ready_snapshot=False)
        why = why_not_saveable(plan.backend_name, plan.transport, self.config.network, "restored from a checkpoint")
        if why is not None:
            raise CheckpointError(f"no restore: {why}")
        checkpoints.check_fits(ck, plan.image, plan.binary, plan.shape)
        return plan

    # ------------------------------------------------------------ messaging

    def _require_running(self) -> bool:
        """Raise unless the VM can be used; a paused one is resumed first (True then)."""
        if self.state == SandboxState.PAUSED:
            return self._wake()
        if self.state == SandboxState.DEAD:
            raise self._death or GuestDied("the microVM is gone")
        if self.state not in (SandboxState.READY, SandboxState.BUSY) or self._channel() is None:
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
        self.pauser.touch()
        if self.pauser.hold(chan, body):
            return
        if self.machine is not None:
            self.machine.send(chan, body)

    def send_message(self, chan: Channel, msg: dict) -> None:
        """Sign ``msg`` with the guest key and queue it for the guest kernel."""
        parts = self._session.serialize(msg)
        aio.loop().call_soon_threadsafe(self._send, chan, wire.pack_parts(parts))

    def pause_reading(self, pause: bool) -> None:
        """Stop (or go on) reading the guest's frames (any thread): the consumer
        of on_guest_frame is behind and holds too many bytes (see kernel.py)."""
        channel = self._channel()
        if channel is not None:
            aio.loop().call_soon_threadsafe(channel.pause_reading if pause else channel.resume_reading)

    def send_raw(self, chan: Channel, parts: list[bytes]) -> None:
        """Queue already-signed multipart frames for the guest kernel (any thread)."""
        if self.state not in _USABLE or (self._channel() is None and self.state != SandboxState.PAUSED):
            raise self._death or SandboxStopped()
        aio.loop().call_soon_threadsafe(self._send, chan, wire.pack_parts(parts))

    def agent_request(self, op: str, timeout: float = 10.0, **fields) -> dict:
        """Run one agent op and return its reply, raising on errors."""
        self._require_running()
        self.pauser.touch()
        try:
            reply = aio.run(self.machine.request(op, timeout=timeout, **fields), timeout + 1)
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
        net = self.machine.net if self.machine else None
        host = {
            "state": self.state.value, "vm_id": self.vm_id,
            "backend": self.backend.name if self.backend else None,
            "accel": self.backend.spec.accel if self.backend else None,
            "accel_reason": self.accel_reason, "transport": self.transport if self.backend else None,
            "network": self.config.network, "profile": self.config.profile,
            "guest_ip": net.lease.guest_ip if net is not None and net.lease else None,
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
        """Whether ``mem_mib`` can be set on the running VM (balloon, up to its
        boot size, and not on a VM whose RAM is a ready snapshot's shared file)."""
        return (self.state in (SandboxState.READY, SandboxState.BUSY) and self.backend is not None
                and hasattr(self.backend, "set_memory") and mem_mib <= self.backend.spec.mem_mib
                and self.backend.balloon_refusal() is None)

    def set_memory(self, mem_mib: int) -> int:
        """Change the running VM's memory through its balloon, keeping its state.

        Only down from, or back up to, the size it booted with, and only on a
        VM that was not restored from a ready snapshot (or has been paused and
        resumed since); returns the guest's memory afterwards in MiB. The
        setting is kept for the next start.
        """
        if not self.can_resize_live(mem_mib):
            why = self.backend.balloon_refusal() if self.backend is not None else None
            raise ConfigError("mem_mib", mem_mib, f"{why}; the new size needs a fresh VM (restart)" if why else
                              "a running VM's memory can change live only up to the size it booted with; "
                              "larger needs a restart")
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
        data = self._read_guest(remote, max_bytes)
        self.record_audit("pull", vm_id=self.vm_id, **self.audit_context, path=remote, bytes=len(data))
        return data

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
