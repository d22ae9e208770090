"""What every tool call gets from the server's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mcp.server.mcpserver import Context
from mcp.server.subscriptions import InMemorySubscriptionBus

from .changes import ChangeFeed, Watcher
from .config import Settings
from .cpu import CpuPool
from .errors import CredentialUnusable, InvalidInput, SocketUnavailable, VMStateError
from .hosts.base import Host
from .hosts.local import LocalHost
from .hosts.pool import PoolLimits, SSHPool
from .hosts.ssh import SSHHost
from .observability import Metrics
from .scopes import Grant
from .security import check_ssh_key, client_identity
from .shared import SharedState
from .targets import HostRequest, NamedHost, load_host_groups, load_named_hosts
from .version import __version__
from .vm.fence import Fence, FenceRules
from .vm.index import VMIndex
from .vm.lifecycle import VMManager
from .vm.spec import NAME_RE, validate_name, validate_path
from .webconsole import ConsoleGrant, ConsoleLinks, console_path

__all__ = ["AppContext"]

#: How long a shutdown waits for state-changing operations under way (a stop may wait for a guest).
OPERATIONS_GRACE_S = 60.0

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class AppContext:
    settings: Settings
    shared: SharedState = field(default_factory=SharedState)
    local: LocalHost = field(default_factory=LocalHost)
    ssh: SSHPool = field(init=False)
    named_hosts: dict[str, NamedHost] = field(init=False)
    host_groups: dict[str, tuple[str, ...]] = field(init=False)
    metrics: Metrics = field(init=False)
    #: State-changing calls run to their end in these tasks, even when their client goes away.
    operations: set[asyncio.Task[Any]] = field(default_factory=set)
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
        self.ssh = SSHPool(PoolLimits.from_settings(self.settings))
        streams = self.shared.monitor_streams
        self.metrics = Metrics(
            pool=self.ssh.snapshot, monitor_streams=lambda: streams.running, cpu_seconds=lambda: cpu.cpu_seconds
        )
        self.named_hosts = load_named_hosts(self.settings.ssh_hosts_file)
        self.host_groups = load_host_groups(self.settings.ssh_hosts_file, self.named_hosts)

    async def __aenter__(self) -> AppContext:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let operations under way finish (bounded), then close what the server holds (SSH pool, ...);
        running VMs are left running."""
        if self.operations:
            pending = list(self.operations)
            log.info("waiting up to %g s for %d operation(s) under way", OPERATIONS_GRACE_S, len(pending))
            _, late = await asyncio.wait(pending, timeout=OPERATIONS_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.ssh.aclose()

    def detach(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` in a task of the server's: cancelling the caller does not cancel it."""
        task = asyncio.get_running_loop().create_task(work)
        self.operations.add(task)
        task.add_done_callback(self.operations.discard)
        return task

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "vm_dir": self.settings.vm_dir,
            "accel_setting": self.settings.accel,
            "accel": self.shared.accel_probe.known(),
            "ssh": {**self.ssh.snapshot(), "named_hosts": sorted(self.named_hosts)},
            "resources": {
                "subscribers": self.changes.interest,
                "watcher_scans": self.watcher.scans if self.watcher is not None else 0,
            },
        }

    @asynccontextmanager
    async def host(self, request: HostRequest) -> AsyncIterator[Host]:
        """The host a call targets: the local machine, or a pooled SSH connection.

        :raise InvalidInput: the host arguments are malformed, ``ssh_key`` is not a key clients may use, or the
            call changes a named host's user or port without a credential of its own.
        """
        if request.is_local:
            yield self.local
            return
        if request.ssh_key:
            self._check_client_key(request)
        target = request.ssh_target(self.named_hosts, client_keys=self.settings.allow_client_ssh_keys)
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.ssh.use(target))
            except CredentialUnusable as exc:
                raise InvalidInput("ssh_key", exc.message) from exc
            yield SSHHost(self.ssh, target)

    def _check_client_key(self, request: HostRequest) -> None:
        """A key is a file of this server: it must lie under ``--ssh-key-dirs``, and it is the operator's
        credential, so by default it opens only the named hosts (which carry their own ``allowed_roots``)."""
        key = request.ssh_key or ""
        check_ssh_key(self.settings, key)
        if (request.host or "").strip() not in self.named_hosts and not self.settings.allow_client_ssh_keys:
            raise InvalidInput(
                "ssh_key",
                f"the server's SSH keys may only be used for the named hosts of its hosts file "
                f"({', '.join(sorted(self.named_hosts)) or 'none configured'}); log in to {request.host} with "
                "ssh_pwd, use a named host, or ask the operator to set --allow-client-ssh-keys",
            )

    def console_link(self, request: HostRequest, vm_dir: str, name: str, ctx: Context[Any, Any]) -> dict[str, Any]:
        """A signed link to the web console of ``name``, for this server's HTTP address as the client reached it.

        :raise InvalidInput: an SSH host given by address and credentials (no credential ever goes into a URL).
        """
        host = self.console_host(request)
        token = self.console_links.sign(host, validate_name(name), vm_dir, client_identity(ctx))
        http = getattr(ctx.request_context, "request", None)
        base = (
            str(http.base_url).rstrip("/") if http is not None else f"http://{self.settings.host}:{self.settings.port}"
        )
        return {"url": base + console_path(host, name, token), "expires_in": self.console_links.ttl}

    def console_host(self, request: HostRequest) -> str:
        """The host part of a console link: ``localhost`` or a named host.

        :raise InvalidInput: a host given by address and credentials (no credential ever goes into a URL).
        """
        host = "localhost" if request.is_local else (request.host or "").strip()
        if not request.is_local and (host not in self.named_hosts or request.ssh_pwd or request.ssh_key):
            raise InvalidInput(
                "host",
                "the web console opens VMs of the local host and of named hosts only (a link carries no "
                "credentials); add the host to the server's hosts file",
            )
        return host

    @asynccontextmanager
    async def open_vnc(self, grant: ConsoleGrant) -> AsyncIterator[socket.socket]:
        """The VNC socket of the VM a console link names, for the web console's WebSocket; the host is held
        for the session (a pooled SSH connection is not closed for idleness under an open console)."""
        request = HostRequest() if grant.host == "localhost" else HostRequest(host=grant.host)
        path = f"{validate_path(grant.vm_dir, 'vm_dir')}/{validate_name(grant.vm)}/vnc.sock"
        async with self.host(request) as host:
            try:
                sock = await host.open_unix_socket(path, timeout=self.settings.qmp_timeout)
            except SocketUnavailable as exc:
                raise VMStateError(f"VM {grant.vm} has no screen to show: is it running? ({exc.reason})") from exc
            with sock:
                yield sock

    def resource_host(self, request: HostRequest, vm_dir: str | None) -> str | None:
        """The ``host`` of the ``vm://`` resources of a call's VM: ``localhost`` or a named host, and only for the
        default vm_dir; ``None`` when the VM is no resource (a host given by address, another vm_dir)."""
        if vm_dir is not None and vm_dir.rstrip("/") != self.default_vm_dir(request).rstrip("/"):
            return None
        if request.is_local:
            return "localhost"
        name = (request.host or "").strip()
        if name in self.named_hosts and not (request.ssh_pwd or request.ssh_key or request.ssh_user):
            return name
        return None

    def fleet_hosts(self, target: str) -> list[str]:
        """The hosts ``*`` (every named host, and the local machine unless --all-hosts-exclude-local) or
        ``@group`` (the hosts file's group) stand for.

        :raise InvalidInput: an unknown group (the message lists the groups).
        """
        if target == "*":
            local = [] if self.settings.all_hosts_exclude_local else ["localhost"]
            return local + sorted(self.named_hosts)
        group = target[1:]
        if group not in self.host_groups:
            known = ", ".join("@" + g for g in sorted(self.host_groups)) or "none (add groups to the hosts file)"
            raise InvalidInput("host", f"no group {group!r}; the groups are: {known}")
        return list(self.host_groups[group])

    def default_vm_dir(self, request: HostRequest) -> str:
        """A call's vm_dir when it gives none: its named host's ``vm_dir``, else the server's."""
        if not request.is_local:
            entry = self.named_hosts.get((request.host or "").strip())
            if entry is not None and entry.vm_dir:
                return entry.vm_dir
        return self.settings.vm_dir

    def fence_rules(self, request: HostRequest) -> FenceRules:
        """The roots paths of a call may use on its host (see :mod:`.vm.fence`)."""
        if request.is_local:
            s = self.settings
            roots = tuple(os.path.expanduser(r) for r in (s.allowed_roots or (s.vm_dir,)))
            return FenceRules(
                roots=roots,
                iso_roots=tuple(os.path.expanduser(r) for r in s.iso_dirs),
                image_roots=tuple(os.path.expanduser(r) for r in s.image_dirs),
            )
        name = (request.host or "").strip()
        entry = self.named_hosts.get(name)
        if entry is not None and entry.allowed_roots:
            return FenceRules(roots=entry.allowed_roots, source=name)
        return FenceRules(roots=None, source=request.display_name)

    @asynccontextmanager
    async def vms(
        self, request: HostRequest, vm_dir: str | None, *, name: str | None = None
    ) -> AsyncIterator[VMManager]:
        """The VMs of ``vm_dir`` (default: the named host's, else the server's) on the call's host, the vm_dir
        checked against the host's roots (resolved there); every further path is checked by the manager as it
        uses it.

        ``name``: the VM the call is about; without ``vm_dir``, the host's index may place it elsewhere.

        :raise InvalidInput: bad host arguments, or a vm_dir outside the roots.
        :raise HostError: the host cannot be reached.
        """
        default = validate_path(self.default_vm_dir(request), "vm_dir")
        directory = validate_path(vm_dir, "vm_dir") if vm_dir else default
        async with self.host(request) as host:
            s = self.settings
            index = VMIndex(host, default, timeout=s.command_timeout, lock_timeout=s.lock_timeout)
            if vm_dir is None and name is not None and NAME_RE.fullmatch(name):
                # A VM created in another vm_dir is found by its name (see vm/index.py).
                directory = await index.lookup(name) or directory
            fence = Fence(host, self.fence_rules(request), self.settings.command_timeout)
            if fence.rules.roots is not None:
                real = (await fence.resolve([directory]))[0]
                fence.check_roots("vm_dir", directory, real, "vm_dir")
            yield VMManager(host, directory, self.settings, self.shared, fence, index)
