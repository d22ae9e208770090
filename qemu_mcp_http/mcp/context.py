"""What every tool call (and the resources, completions and confirmations) gets from the server's lifespan.

One object per job, made and closed here: :class:`~qemu_mcp_http.fleet.hosts.Fleet` (which host a call means,
and the SSH connections), :class:`~qemu_mcp_http.vm.manager.VMManagers` (the VMs of a call's host and vm_dir),
the change feed of the resources, the web console's links, the tokens' grants, the metrics, the operations
under way, the monitor streams and the shutdown signal.
"""

from __future__ import annotations

import secrets
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from mcp.server.subscriptions import InMemorySubscriptionBus

from ..access.grants import Grant
from ..config import Settings
from ..console.links import ConsoleLinks
from ..cpu import CpuPool
from ..fleet.changes import ChangeFeed, Watcher
from ..fleet.hosts import Fleet
from ..fleet.shutdown import ShutdownSignal
from ..fleet.targets import HostRequest
from ..monitoring.streams import StreamLimiter
from ..observability import Metrics
from ..vm.manager import VMManager, VMManagers
from ..vm.shared import SharedState
from .operations import Operations

__all__ = ["AppContext"]


@dataclass
class AppContext:
    settings: Settings
    shared: SharedState = field(default_factory=SharedState)
    #: The hosts a call may name and the SSH connections to them.
    fleet: Fleet = field(init=False)
    #: The VMs of a call (see :meth:`vms`).
    managers: VMManagers = field(init=False)
    metrics: Metrics = field(init=False)
    #: monitor_vm_status streams running now, per client.
    monitor_streams: StreamLimiter = field(default_factory=StreamLimiter)
    #: Tells open-ended calls (monitor streams) that the server is going down.
    shutdown: ShutdownSignal = field(default_factory=ShutdownSignal)
    #: State-changing calls run to their end in these tasks, even when their client goes away.
    operations: Operations = field(default_factory=Operations)
    #: Short-lived signed links to the web console (a random key per process: links die with it).
    console_links: ConsoleLinks = field(default_factory=lambda: ConsoleLinks(secrets.token_bytes(32)))
    #: Bearer tokens and what each allows (empty: no tokens, every caller may do everything).
    grants: dict[str, Grant] = field(default_factory=dict)
    #: Change notifications of the VM resources (its bus is the MCP server's; see build_mcp).
    changes: ChangeFeed = field(default_factory=lambda: ChangeFeed(InMemorySubscriptionBus()))
    #: Notices changes made outside the server while somebody is subscribed (set by build_mcp).
    watcher: Watcher | None = None

    def __post_init__(self) -> None:
        """:raise ValueError: the named-hosts file is unreadable or malformed."""
        self.shared.qmp.idle_timeout = self.settings.qmp_idle_hold
        cpu = self.shared.cpu = CpuPool(self.settings.cpu_workers, self.settings.pattern_cpu_per_client)
        self.fleet = Fleet(self.settings)
        self.managers = VMManagers(self.fleet, self.settings, self.shared)
        streams = self.monitor_streams
        self.metrics = Metrics(
            pool=self.fleet.ssh.snapshot, monitor_streams=lambda: streams.running, cpu_seconds=lambda: cpu.cpu_seconds
        )

    async def __aenter__(self) -> AppContext:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let operations under way finish (bounded), then close what the server holds (SSH pool, ...);
        running VMs are left running."""
        await self.operations.drain()
        await self.fleet.aclose()

    def vms(
        self, request: HostRequest, vm_dir: str | None, *, name: str | None = None
    ) -> AbstractAsyncContextManager[VMManager]:
        """The VMs of ``vm_dir`` (default: the named host's, else the server's) on the call's host: the one entry
        point from a tool to the VMs (see :meth:`VMManagers.open`)."""
        return self.managers.open(request, vm_dir, name=name)
