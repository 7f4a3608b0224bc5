"""Machine: one running microVM, from its VMM's launch to its teardown.

A Machine owns what exists for one VM and nothing else: its id and registry
row, its VMM (the backend), the channel to its agent, the guest kernel's key,
and what was made for it (cgroup, TAP and rules, SSH keys, the vsock secret).
It connects and says hello, watches the VMM's exit and the channel's end,
pings a silent guest (the heartbeat) and tears everything down once.

What it learns it hands on through the callables its owner gives it (the
Sandbox, see sandbox.py): Jupyter frames, agent events, and a death, each
with the VM's id so that news about a replaced VM is dropped. It never looks
at the owner's state; pause.py and boot.py use its methods, not its fields.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import signal
import time
from collections.abc import Callable

from smolvm_guest import wire
from smolvm_guest.wire import Channel
from smolvm_kernel import timeline
from smolvm_kernel.backends.base import Backend
from smolvm_kernel.channel.stream import GuestChannel
from smolvm_kernel.errors import BootTimeout, GuestDied, ProtocolError, SmolVMError
from smolvm_kernel.host.registry import Registry
from smolvm_kernel.vm import guest_news
from smolvm_kernel.vm.session import Session

log = logging.getLogger("smolvm_kernel")

#: The heartbeat (see Machine.heartbeat): silence before a ping, and how long
#: its answer may take. Generous for a TCG guest on a loaded host: a ping costs
#: the guest about a millisecond of CPU.
HEARTBEAT_IDLE_S = 2.0
HEARTBEAT_TIMEOUT_S = 8.0


@dataclasses.dataclass
class Hooks:
    """What a Machine tells its owner (all called on the loop, the VM's id first)."""

    #: A Jupyter frame from the guest (channel, body); untrusted, never raises out.
    frame: Callable[[Channel, bytes], None]
    #: A decoded agent event (a dict the guest wrote).
    agent_event: Callable[[dict], None]
    #: The VM, its agent or its kernel died.
    death: Callable[[SmolVMError, str | None], None]
    #: Each heartbeat tick: True when the owner paused the VM (the beat stops).
    idle: Callable[[], bool] = lambda: False
    #: Whether the owner still runs this VM (the heartbeat ends when not).
    running: Callable[[], bool] = lambda: True
    #: Whether the VM is paused on purpose (its VMM's exit is then no death).
    paused: Callable[[], bool] = lambda: False
    #: The agent of a new or restored VM answered hello (its kernel may still
    #: be taking its key): the machine, for requests to send before any cell.
    hello: Callable[["Machine"], None] = lambda machine: None


class Machine:
    """One microVM: VMM, channel, key, and the host resources made for it."""

    def __init__(self, vm_id: str, transport: str, *, registry: Registry, hooks: Hooks,
                 max_message_bytes: int, boot_timeout: float, vmm_overhead_mib: int, netns: str = "") -> None:
        self.vm_id = vm_id
        self.transport = transport
        self.registry = registry
        self.hooks = hooks
        self.max_message_bytes = max_message_bytes
        self.boot_timeout = boot_timeout
        self.vmm_overhead_mib = vmm_overhead_mib
        self.netns = netns
        self.backend: Backend | None = None
        self.channel: GuestChannel | None = None
        self.guest_key = b""
        self.session: Session | None = None
        self.kernel_info: dict = {}
        self.started_at: float | None = None
        self.net = None            # host.net.VMNetwork while the VM has a NIC
        self.ssh_keys = None       # channel.ssh.SSHKeys while the transport is SSH
        self.link_secret = ""      # the vsock hello's secret (boot.py puts it in the seed)
        self.death: SmolVMError | None = None
        #: Whether the hello asks the agent for its fault-injection op (tests only).
        self.faults = False
        self._ssh_client = None
        self._ready: asyncio.Future | None = None
        self._heartbeat: asyncio.Task | None = None
        self._gone = False

    # ------------------------------------------------------------ launch and connect

    async def launch(self, backend: Backend, *, restore: bool) -> None:
        """Start the VMM, record its pid, and connect (a restore gets a shorter wait)."""
        self.backend = backend
        timeline.mark("VMM launch begins")
        await backend.launch()
        timeline.mark("VMM running (state loaded)")
        self.registry.set_vmm(self.vm_id, backend.pid)
        self.started_at = time.time()
        # A restore answers in about a second; do not wait a whole cold-boot
        # timeout before falling back.
        await self.connect(time.monotonic(), min(self.boot_timeout, 30.0) if restore else None)

    async def relaunch(self, backend: Backend) -> None:
        """Load a paused VM into a new VMM and reconnect under the same key (pause.py)."""
        self.backend = backend
        await backend.launch()
        self.registry.set_vmm(self.vm_id, backend.pid)
        await self.connect(time.monotonic(), min(self.boot_timeout, 30.0), resume=True)

    async def connect(self, t0: float, timeout: float | None = None, resume: bool = False) -> None:
        """Open the channel and say hello: a new key for a new or restored VM,
        the same key for one resumed from a pause (its kernel is ready)."""
        backend = self.backend
        timeout = timeout or self.boot_timeout
        loop = asyncio.get_running_loop()

        def remaining() -> float:
            return max(0.1, timeout - (time.monotonic() - t0))

        try:
            if self.transport == "ssh":
                from smolvm_kernel.channel import ssh

                reader, writer, self._ssh_client = await ssh.open_channel(
                    self.net.lease.guest_ip, self.ssh_keys, netns=self.netns,
                    timeout=remaining(), alive=lambda: backend.poll() is None)
            else:
                reader, writer = await backend.open_channel(remaining())
            timeline.mark("channel open")
        except ConnectionError as exc:
            if isinstance(exc, SmolVMError):    # a pinned host key that does not match
                raise
            raise self._boot_failure("the guest channel", timeout) from None
        self._ready = loop.create_future()
        self.channel = GuestChannel(reader, writer, self._on_frame, self._on_channel_close,
                                    max_frame=self.max_message_bytes + 64 * 1024)
        if resume:
            key = self.guest_key.decode()
        else:
            key = secrets.token_hex(32)
            self.guest_key = key.encode()
            self.session = Session(key=self.guest_key, username="smolvm")
        watcher = asyncio.create_task(backend.wait())
        try:
            handshake = asyncio.create_task(self.channel.handshake(
                {"key": key, "max_frame": self.max_message_bytes,
                 **({"secret": self.link_secret} if self.link_secret else {}),
                 **({"faults": True} if self.faults else {})}, remaining()))
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
            self.channel.start()
            if not resume:
                self.hooks.hello(self)
            if not (resume and hello.get("kernel_ready") is True):
                done, _ = await asyncio.wait({self._ready, watcher}, timeout=remaining(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if self._ready not in done:
                    raise self._boot_failure("a ready guest kernel", timeout)
                self.kernel_info = self._ready.result()
        except BaseException:
            watcher.cancel()
            raise
        watcher.add_done_callback(self._on_vm_exit)

    def kernel_ready(self, info: dict) -> None:
        """The agent's "ready" event: the guest kernel answers (its kernel_info)."""
        timeline.mark("guest kernel ready (event in)")
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(info)

    def _boot_failure(self, stage: str, timeout: float) -> SmolVMError:
        backend = self.backend
        code = backend.poll() if backend else None
        if self.death is not None:
            return self.death
        if code is not None:
            return self.over_host_limit() or GuestDied(
                f"the VMM exited with status {code} while booting",
                backend.vmm_log_tail() + "\n--- guest console (tail) ---\n" + backend.console_tail())
        return BootTimeout(timeout, stage, backend.console_tail() if backend else "")

    # ------------------------------------------------------------ while it runs

    def send(self, chan: Channel, body: bytes) -> bool:
        """One frame to the guest (on the loop); False when there is no channel."""
        channel = self.channel
        if channel is None:
            return False
        channel.send(chan, body)
        return True

    async def request(self, op: str, timeout: float, **fields) -> dict:
        """One agent op's reply (raises ConnectionError when there is no channel)."""
        channel = self.channel
        if channel is None:
            raise ConnectionError("no channel to the guest agent")
        return await channel.request(op, timeout=timeout, **fields)

    def start_heartbeat(self) -> None:
        self._heartbeat = asyncio.get_running_loop().create_task(self.heartbeat())

    async def heartbeat(self) -> None:
        """A VMM can hang while its process runs (a deadlock, a guest stuck in its
        kernel, vCPUs stopped through the monitor): the guest then just goes
        silent. After HEARTBEAT_IDLE_S of silence the agent is pinged; no answer
        within HEARTBEAT_TIMEOUT_S means the VM is gone: it is reported and its
        VMM killed."""
        loop = asyncio.get_running_loop()
        while not self._gone and self.hooks.running():
            await asyncio.sleep(1.0)
            chan = self.channel
            if chan is None or self._gone:
                return
            if self.hooks.idle():
                return      # paused: the resume starts a new heartbeat
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
                if self._gone or loop.time() - chan.last_heard < HEARTBEAT_TIMEOUT_S:
                    continue
                self.die(GuestDied(
                    f"the microVM stopped responding: its agent answered no heartbeat for "
                    f"{HEARTBEAT_TIMEOUT_S:g} s (a hung VMM, or a guest stuck in its kernel)",
                    "the VM was destroyed; a fresh one starts on the next cell (reset() with the Python API)"))
                if self.backend is not None:
                    self.backend.send_signal(signal.SIGKILL)
                return
            except Exception:   # the channel closed: that path reports the death
                return

    # ------------------------------------------------------------ deaths

    def die(self, error: SmolVMError) -> None:
        """Report this VM's death to the owner (once it is stopped, nothing is)."""
        if self._gone:
            return
        if self.death is None:
            self.death = error
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()     # retrieved: the boot's wait reports it
        self.hooks.death(error, self.vm_id)

    def _on_vm_exit(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._gone or self.backend is None or self.hooks.paused():
            return      # a paused VM's VMM ends on purpose
        code = task.result()
        console = self.backend.console_tail(16000)   # a panic's line comes before its stack dump
        self.die(self.over_host_limit() or GuestDied(
            f"the microVM exited (status {code}){guest_news.console_cause(console)}",
            "--- guest console (tail) ---\n" + console[-2000:]))

    def over_host_limit(self) -> GuestDied | None:
        """The VMM's death, if its cgroup's memory limit caused it."""
        group = self.backend.spec.cgroup if self.backend else None
        if group is None or not group.oom_kills():
            return None
        return GuestDied(
            f"the microVM's VMM went over its host memory limit of {group.limits.memory_bytes // 2**20} MiB "
            f"(the VM's {self.backend.spec.mem_mib} MiB plus vmm_overhead_mib={self.vmm_overhead_mib}) "
            f"and the host stopped it", "raise vmm_overhead_mib if the VMM needs more (QEMU under TCG "
            "uses about 130 MiB beyond the guest's RAM)")

    def _on_channel_close(self, error: BaseException | None) -> None:
        if self.backend is None or self._gone or self.hooks.paused():
            return
        if isinstance(error, ProtocolError):
            # Not a Jupyter guest any more (root in the VM writing to the channel):
            # nothing more it says is read, and its VMM goes now.
            self.die(GuestDied(f"the microVM was stopped: {error}",
                               "a fresh one starts on the next cell (reset() with the Python API)"))
            self.backend.send_signal(signal.SIGKILL)
            return
        died = GuestDied("the channel to the guest agent closed", f"{error or 'end of stream'}")
        # The stream usually ends because the VMM died; give its exit a moment
        # to be seen so the cell reports that, the more useful cause.
        asyncio.get_running_loop().call_later(0.5, self.die, died)

    def _on_frame(self, chan: Channel, body: bytes) -> None:
        """One frame from the (untrusted) guest; whatever it holds, this never raises."""
        try:
            if chan == Channel.AGENT:
                self.hooks.agent_event(wire.decode_json(body))
            else:
                self.hooks.frame(chan, body)
        except Exception as exc:   # a malformed frame must not end the read loop
            log.warning("dropped a %s frame from the guest: %s: %s", chan.name, type(exc).__name__, exc)

    # ------------------------------------------------------------ pause and stop

    async def detach(self) -> None:
        """End the VMM and close the channel, keeping the VM's files (a pause)."""
        chan, self.channel = self.channel, None
        if chan is not None:
            await chan.close()
        if self.backend is not None:
            await self.backend.kill()

    async def stop(self) -> None:
        """Stop the VM and free what it held (VMM, files, TAP, rules, registry row)."""
        self._gone = True
        task, self._heartbeat = self._heartbeat, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        chan, self.channel = self.channel, None
        if chan is not None:
            await chan.close()
        backend = self.backend
        if backend is not None:
            await backend.terminate(grace=1.0)
            await backend.kill()
            await backend.cleanup()
        client, self._ssh_client = self._ssh_client, None
        if client is not None:
            client.close()
        net, self.net = self.net, None
        if net is not None:
            await asyncio.to_thread(net.teardown)
        self.ssh_keys = None
        self.link_secret = ""
        await asyncio.to_thread(self.registry.remove, self.vm_id)
