"""Change notifications for the VM resources (``vm://{host}/{name}``), on both kinds of MCP client.

* 2026-07-28 clients open ``subscriptions/listen``; the SDK's ``ListenHandler`` forwards the events of the
  :class:`~mcp.server.subscriptions.SubscriptionBus` to those streams.
* Clients of the handshake revisions send ``resources/subscribe``; :class:`ChangeFeed` records their sessions
  and sends them ``notifications/resources/updated`` / ``list_changed`` for the bus's events (a bus listener
  feeds a queue that a task drains, since bus listeners must not block or raise).

Every event goes through the bus, so a bus shared by several server processes (see ``--redis-url``) reaches
the subscribers of all of them.  A list change names its host (:class:`HostListChanged`), and each subscriber
hears only of the hosts its token may reach: listen streams through :class:`ScopedBus`, 2025 sessions by the
hosts recorded when they subscribed; a list change that names no host reaches only tokens without ``hosts=``.

Events come from two places: the tools (a change this server made, at once) and :class:`Watcher`, which
notices changes made by anything else (a guest powering off, ``kill -9``, another server) by scanning the
watched hosts' default vm_dir, and only while somebody is subscribed. Locally, each running VM's process is
also watched through a pidfd, so that its exit is seen at once rather than at the next scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated, ServerEvent, SubscriptionBus
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, EmptyResult, SubscribeRequestParams, UnsubscribeRequestParams

from ..errors import QemuMcpError

__all__ = [
    "ChangeFeed",
    "HostListChanged",
    "ScopedBus",
    "VMFingerprint",
    "Watcher",
    "parse_vm_uri",
    "visible",
    "vm_uri",
    "vm_uris",
]

log = logging.getLogger(__name__)

#: The parts of a VM resource: the VM, its serial console, its screen.
VIEWS = ("", "/console", "/screen")


def vm_uri(host: str, name: str, view: str = "") -> str:
    return f"vm://{host}/{name}{view}"


def vm_uris(host: str, name: str) -> list[str]:
    """Every resource of one VM: a change of the VM is a change of each."""
    return [vm_uri(host, name, view) for view in VIEWS]


def parse_vm_uri(uri: str) -> tuple[str, str] | None:
    """``(host, name)`` of ``vm://host/name[/console|/screen]``; ``None`` for anything else."""
    if not uri.startswith("vm://"):
        return None
    host, _, rest = uri[len("vm://") :].partition("/")
    name, _, view = rest.partition("/")
    if not host or not name or (view and f"/{view}" not in VIEWS):
        return None
    return host, name


@dataclass(frozen=True)
class HostListChanged(ResourcesListChanged):
    """The VMs of ``host`` appeared or went away (a ``list_changed`` that knows its host)."""

    host: str


#: The hosts a subscriber's token may reach; ``None``: every host.
Reach = frozenset[str] | None


def visible(event: ServerEvent, hosts: Reach) -> bool:
    """Whether a subscriber that may reach ``hosts`` may hear of ``event``."""
    if hosts is None:
        return True
    if isinstance(event, HostListChanged):
        return event.host in hosts
    if isinstance(event, ResourcesListChanged):
        return False  # no host named: only for tokens that reach every host
    if isinstance(event, ResourceUpdated):
        parsed = parse_vm_uri(event.uri)
        return parsed is None or parsed[0] in hosts
    return True


def _narrower(first: Reach, second: Reach) -> Reach:
    if first is None:
        return second
    return first if second is None else first & second


class ScopedBus:
    """The bus as the SDK's listen streams see it: each stream's listener hears only the events of the hosts
    the token that opened it may reach (``reach()`` is read when the stream subscribes, in its request)."""

    def __init__(self, bus: SubscriptionBus, reach: Callable[[], Reach]) -> None:
        self.bus = bus
        self.reach = reach

    async def publish(self, event: ServerEvent) -> None:
        await self.bus.publish(event)

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        hosts = self.reach()
        if hosts is None:
            return self.bus.subscribe(listener)

        def scoped(event: ServerEvent) -> None:
            if visible(event, hosts):
                listener(event)

        return self.bus.subscribe(scoped)


#: What the watcher compares between two scans of a VM: its definition, whether it runs and its pid.
VMFingerprint = tuple[str, bool, int | None]
#: One scan of a host: VM name -> fingerprint, and the pids of its running VMs (local hosts only).
Scan = Callable[[str], Awaitable[dict[str, VMFingerprint]]]


@dataclass
class _Legacy:
    session: ServerSession
    uris: set[str] = field(default_factory=set)
    #: The hosts its token may reach (the narrowest seen over its subscribe requests).
    hosts: Reach = None


class ChangeFeed:
    """Who listens (for the watcher), the 2025 sessions' subscriptions, and publishing."""

    def __init__(self, bus: SubscriptionBus, reach: Callable[[], Reach] | None = None) -> None:
        self.bus = bus
        #: The hosts the caller of the current request may hear about (a token's ``hosts=``; ``None``: all).
        self.reach: Callable[[], Reach] = reach or (lambda: None)
        self._listen: dict[int, tuple[bool, frozenset[str], Reach]] = {}
        self._legacy: dict[int, _Legacy] = {}
        self._interest_changed = asyncio.Event()
        self._outbox: asyncio.Queue[ServerEvent] = asyncio.Queue(maxsize=10_000)
        self._unsubscribe: Callable[[], None] | None = None
        #: (host, name) published by a tool since the watcher's last scan of that host: not published again.
        self.published: set[tuple[str, str]] = set()
        self.list_published: set[str] = set()

    # -- who listens ----------------------------------------------------------------------------

    @property
    def interest(self) -> int:
        """Open listen streams plus 2025 sessions with at least one subscription."""
        return len(self._listen) + sum(1 for entry in self._legacy.values() if entry.uris)

    def wanted_hosts(self) -> tuple[bool, frozenset[str]]:
        """``(every host, these hosts)``: a listen stream for list changes wants every host its token reaches;
        a subscription to a VM wants its host."""
        every = any(wants_list and hosts is None for wants_list, _, hosts in self._listen.values())
        reached = {h for wants_list, _, hosts in self._listen.values() if wants_list and hosts for h in hosts}
        uris = [u for _, listened, _ in self._listen.values() for u in listened]
        uris += [u for entry in self._legacy.values() for u in entry.uris]
        named = {parsed[0] for parsed in map(parse_vm_uri, uris) if parsed is not None}
        return every, frozenset(named | reached)

    async def interest_changed(self) -> None:
        await self._interest_changed.wait()
        self._interest_changed.clear()

    def _poke(self) -> None:
        self._interest_changed.set()

    async def listen_middleware(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Sees each ``subscriptions/listen`` stream open and close (``call_next`` returns when it ends)."""
        if ctx.method != "subscriptions/listen":
            return await call_next(ctx)
        wanted = dict((ctx.params or {}).get("notifications") or {})
        uris = frozenset(u for u in wanted.get("resourceSubscriptions") or () if isinstance(u, str))
        hosts = self._check_reach(uris)
        key = id(ctx)
        self._listen[key] = (wanted.get("resourcesListChanged") is True, uris, hosts)
        self._poke()
        try:
            return await call_next(ctx)
        finally:
            self._listen.pop(key, None)
            self._poke()

    def _check_reach(self, uris: Iterable[str]) -> Reach:
        """The hosts the caller may reach; :raise MCPError: a URI names a host beyond them."""
        hosts = self.reach()
        for uri in uris:
            parsed = parse_vm_uri(uri)
            if parsed is not None and hosts is not None and parsed[0] not in hosts:
                raise MCPError(code=INVALID_PARAMS, message=f"this token may not reach host {parsed[0]!r} ({uri})")
        return hosts

    async def on_subscribe(self, ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
        """``resources/subscribe`` (handshake revisions): remembered until unsubscribe or the session ends."""
        hosts = self._check_reach([str(params.uri)])
        # The SDK has no public way from a handler to its connection; its exit_stack is the documented
        # per-connection teardown (client DELETE, idle timeout, crash).
        connection = ctx.session._connection
        key = id(connection)
        if key not in self._legacy:
            self._legacy[key] = _Legacy(ctx.session, hosts=hosts)

            def gone() -> None:
                self._legacy.pop(key, None)
                self._poke()

            connection.exit_stack.callback(gone)
        entry = self._legacy[key]
        entry.hosts = _narrower(entry.hosts, hosts)
        entry.uris.add(str(params.uri))
        self._poke()
        return EmptyResult()

    async def on_unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams
    ) -> EmptyResult:
        entry = self._legacy.get(id(ctx.session._connection))
        if entry is not None:
            entry.uris.discard(str(params.uri))
            self._poke()
        return EmptyResult()

    # -- publishing -----------------------------------------------------------------------------

    async def vm_changed(self, host: str, name: str, *, listed: bool = False) -> None:
        """A VM of ``host``'s default vm_dir changed (``listed``: it appeared or went away)."""
        self.published.add((host, name))
        if listed:
            self.list_published.add(host)
        for uri in vm_uris(host, name):
            await self.bus.publish(ResourceUpdated(uri=uri))
        if listed:
            await self.bus.publish(HostListChanged(host=host))

    def _on_bus_event(self, event: ServerEvent) -> None:
        if isinstance(event, ResourceUpdated) and (parsed := parse_vm_uri(event.uri)) is not None:
            # Heard from a tool of this server or of another replica: the watcher need not say it again.
            self.published.add(parsed)
        if not self._legacy:
            return
        with contextlib.suppress(asyncio.QueueFull):  # a stuck client must not grow the server without bound
            self._outbox.put_nowait(event)

    async def run(self) -> None:
        """Deliver bus events to the 2025 sessions that subscribed (for the server's lifetime)."""
        self._unsubscribe = self.bus.subscribe(self._on_bus_event)
        try:
            while True:
                event = await self._outbox.get()
                for entry in list(self._legacy.values()):
                    if not visible(event, entry.hosts):
                        continue
                    try:
                        if isinstance(event, ResourceUpdated) and event.uri in entry.uris:
                            await entry.session.send_resource_updated(event.uri)
                        elif isinstance(event, ResourcesListChanged):
                            await entry.session.send_resource_list_changed()
                    except Exception:  # one broken session must not stop the others' notifications
                        log.debug("notification to a session failed", exc_info=True)
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()


class Watcher:
    """Scans the hosts somebody listens to, and publishes what changed; idle (no scan, no task work) while
    nobody is subscribed.

    ``scan(host)`` gives the fingerprints of a host's VMs; ``hosts()`` every host resources cover.
    """

    def __init__(
        self,
        feed: ChangeFeed,
        scan: Scan,
        hosts: Callable[[], list[str]],
        *,
        local_interval: float,
        remote_interval: float,
    ) -> None:
        self.feed = feed
        self.scan = scan
        self.hosts = hosts
        self.local_interval = local_interval
        self.remote_interval = remote_interval
        self.scans = 0
        self._known: dict[str, dict[str, VMFingerprint]] = {}
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._pidfds: dict[int, int] = {}
        self._exited: set[int] = set()

    async def run(self) -> None:
        try:
            while True:
                if self.feed.interest == 0:
                    self._forget()
                    await self.feed.interest_changed()
                    continue
                await self._round()
                await self._sleep()
        finally:
            self._forget()

    def _forget(self) -> None:
        """Nobody listens: drop what was seen (the next subscriber starts from a fresh scan) and the pidfds."""
        self._known.clear()
        self._due.clear()
        self.feed.published.clear()
        self.feed.list_published.clear()
        for fd in list(self._pidfds.values()):
            self._close_pidfd(fd)
        self._pidfds.clear()
        self._exited.clear()

    def _watched(self) -> list[str]:
        every, hosts = self.feed.wanted_hosts()
        known = self.hosts()
        return known if every else [h for h in known if h in hosts]

    async def _round(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        watched = self._watched()
        for host in list(self._known):
            if host not in watched:
                self._known.pop(host, None)
                self._due.pop(host, None)
        due = [h for h in watched if self._due.get(h, 0.0) <= now or h not in self._known]
        results = await asyncio.gather(*(self._scan_one(h) for h in due))
        for host, found in zip(due, results, strict=True):
            interval = self.local_interval if host == "localhost" else self.remote_interval
            self._due[host] = loop.time() + interval
            if found is None:
                continue
            await self._compare(host, found)

    async def _scan_one(self, host: str) -> dict[str, VMFingerprint] | None:
        try:
            found = await self.scan(host)
        except QemuMcpError as exc:  # an unreachable host is tried again at its next turn
            log.debug("watcher: scan of %s failed: %s", host, exc)
            return None
        self.scans += 1
        return found

    async def _compare(self, host: str, found: dict[str, VMFingerprint]) -> None:
        before = self._known.get(host)
        self._known[host] = found
        by_tool = {name for h, name in self.feed.published if h == host}
        self.feed.published -= {(host, name) for name in by_tool}
        listed_by_tool = host in self.feed.list_published
        self.feed.list_published.discard(host)
        if host == "localhost":
            self._watch_pids({fp[2] for fp in found.values() if fp[1] and fp[2]})
        if before is None:
            return  # the first scan is the baseline
        changed = sorted(name for name in found.keys() | before.keys() if found.get(name) != before.get(name))
        for name in changed:
            if name not in by_tool:
                for uri in vm_uris(host, name):
                    await self.feed.bus.publish(ResourceUpdated(uri=uri))
        if found.keys() != before.keys() and not listed_by_tool:
            await self.feed.bus.publish(HostListChanged(host=host))

    # -- local process exits, at once -------------------------------------------------------------

    def _watch_pids(self, pids: set[int]) -> None:
        self._exited &= pids  # a pid seen exiting and no longer listed: forget it
        for pid in list(self._pidfds):
            if pid not in pids:
                self._close_pidfd(self._pidfds.pop(pid))
        for pid in pids - self._pidfds.keys() - self._exited:
            try:
                fd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                continue  # gone already (the next scan sees it), or no pidfd here: the scan interval applies
            self._pidfds[pid] = fd
            asyncio.get_running_loop().add_reader(fd, self._on_exit, pid)

    def _on_exit(self, pid: int) -> None:
        """One-shot: a pidfd stays readable, and a process that is gone but not yet reaped may still look
        alive to the next scan; it is not watched again."""
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            self._close_pidfd(fd)
        self._exited.add(pid)
        self._wake.set()

    def _close_pidfd(self, fd: int) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    async def _sleep(self) -> None:
        loop = asyncio.get_running_loop()
        next_due = min(self._due.values(), default=loop.time() + self.local_interval)
        delay = max(0.0, next_due - loop.time())
        wake = asyncio.ensure_future(self._wake.wait())
        interest = asyncio.ensure_future(self.feed.interest_changed())
        try:
            await asyncio.wait({wake, interest}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (wake, interest):
                waiter.cancel()
            await asyncio.gather(wake, interest, return_exceptions=True)
        if self._wake.is_set():
            self._wake.clear()
            self._due["localhost"] = 0.0  # a VM process exited: scan at once
