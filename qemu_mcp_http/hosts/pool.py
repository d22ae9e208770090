"""Pooled asyncssh connections: one per (host, port, user, credential), shared by every call.

A connection carries many channels at once: exec sessions (bounded per connection,
below sshd's ``MaxSessions``), one SFTP session that every file operation shares, and
direct-streamlocal channels to the VMs' unix sockets.  When every exec slot of every
connection to a target is busy, a further connection is opened, up to the per-host
limit; then calls wait (within their timeout).  Connections are kept alive, closed
after an idle time, and replaced when they drop.

Connecting (options, host keys, credentials) is :mod:`.connect`'s; the pool decides when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from ..errors import OperationTimeout, QemuMcpError
from .coalesce import Coalescer
from .connect import ClientHooks, Connector
from .stats import PoolStats
from .target import PoolLimits, SSHTarget

__all__ = ["PoolLimits", "PoolStats", "SSHConnection", "SSHPool", "SSHTarget"]

log = logging.getLogger(__name__)


class SSHConnection:
    """One pooled connection: its exec slots, its shared SFTP session, its liveness."""

    def __init__(self, conn: asyncssh.SSHClientConnection, client: ClientHooks, target: SSHTarget, stats: PoolStats):
        self.conn = conn
        self.client = client
        self.target = target
        self.stats = stats
        self.busy = 0
        self.last_used = asyncio.get_running_loop().time()
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()
        self._closed = False

    @property
    def alive(self) -> bool:
        return not (self._closed or self.client.lost)

    def touch(self) -> None:
        self.last_used = asyncio.get_running_loop().time()

    async def sftp(self, timeout: float) -> asyncssh.SFTPClient:
        """The connection's SFTP session, started on first use and then shared.

        :raise OperationTimeout: the SFTP subsystem did not start in time.
        :raise asyncssh.Error: the connection failed (the caller maps it).
        """
        async with self._sftp_lock:
            if self._sftp is None:
                self.stats.count(channels_opened=1, round_trips=3)  # channel open, subsystem request, SFTP init
                try:
                    self._sftp = await asyncio.wait_for(self.conn.start_sftp_client(), timeout)
                except TimeoutError as exc:
                    raise OperationTimeout(
                        f"SFTP on {self.target.host} did not start within {timeout:g} s "
                        "(is the sftp subsystem enabled in sshd_config?)"
                    ) from exc
            return self._sftp

    def forget_sftp(self) -> None:
        """Drop a broken SFTP session; the next file operation starts a new one."""
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None

    async def aclose(self, timeout: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.stats.count(connections_closed=1)
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        self.conn.close()
        try:
            await asyncio.wait_for(self.conn.wait_closed(), timeout)
        except Exception:
            log.debug("SSH connection to %s did not close cleanly", self.target.label, exc_info=True)


@dataclass
class _Slot:
    """The connections of one (host, port, user, credential)."""

    target: SSHTarget
    conns: list[SSHConnection] = field(default_factory=list)
    users: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    #: The connect in flight: concurrent callers share it (and its failure) instead of queueing their own.
    pending: asyncio.Task[SSHConnection] | None = None

    def live(self) -> list[SSHConnection]:
        self.conns[:] = [c for c in self.conns if c.alive]
        return list(self.conns)


class SSHPool:
    """Every SSH connection of the server.  Close it with :meth:`aclose`."""

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.stats = PoolStats()
        self._slots: dict[tuple[str, int, str, str, str], _Slot] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.connector = Connector(limits, self.stats)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Concurrent identical reads (list_vms of one vm_dir) share one run; see :class:`Coalescer`.
        self.coalescer = Coalescer()

    # -- leases ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, target: SSHTarget) -> AsyncIterator[None]:
        """Hold ``target`` for a tool call: connect (or reuse) now, so that bad credentials fail first.

        While held, its connections are not closed for idleness.

        :raise HostAuthFailed, HostKeyRejected, HostUnreachable, InvalidInput, HostError: see :meth:`connection`.
        """
        slot = self._slot(target)
        slot.users += 1
        try:
            if slot.live():
                self.stats.count(connections_reused=1)
            await self.connection(target)
            yield
        finally:
            slot.users -= 1
            for conn in slot.conns:
                conn.touch()

    async def connection(self, target: SSHTarget) -> SSHConnection:
        """The least busy live connection to ``target``, opening the first one if needed."""
        slot = self._slot(target)
        live = slot.live()
        if live:
            return min(live, key=lambda c: c.busy)
        return await self._connect(slot)

    async def _connect(self, slot: _Slot) -> SSHConnection:
        """Open a connection for ``slot``, or join the one being opened; every joiner gets its outcome."""
        if slot.pending is None:
            task = asyncio.get_running_loop().create_task(self._open(slot.target), name="ssh-connect")
            slot.pending = task

            def done(t: asyncio.Task[SSHConnection]) -> None:
                slot.pending = None
                if not t.cancelled() and t.exception() is None:
                    slot.conns.append(t.result())

            task.add_done_callback(done)
        return await asyncio.shield(slot.pending)

    @contextlib.asynccontextmanager
    async def exec_slot(self, target: SSHTarget, timeout: float) -> AsyncIterator[SSHConnection]:
        """A connection with a free exec channel, held for the block.

        Opens a further connection when all are busy and the per-host limit allows; otherwise waits.

        :raise OperationTimeout: no channel came free within ``timeout``.
        """
        slot = self._slot(target)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn: SSHConnection | None = None
        while conn is None:
            live = slot.live()
            free = [c for c in live if c.busy < self.limits.exec_slots]
            if free:
                conn = min(free, key=lambda c: c.busy)
            elif slot.pending is not None or len(live) < self.limits.max_connections_per_host:
                try:
                    await self._connect(slot)  # a further connection (or join the one being opened)
                except QemuMcpError:
                    if not live:
                        raise
                    log.info("could not open a further SSH connection to %s; waiting for a channel", target.label)
                    await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
                continue
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise OperationTimeout(
                        f"no free SSH channel to {target.host} within {timeout:g} s "
                        f"({self.limits.max_connections_per_host} connections x {self.limits.exec_slots} "
                        "channels busy); retry later or raise QEMU_MCP_SSH_MAX_CONNECTIONS_PER_HOST"
                    )
                async with slot.changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(slot.changed.wait(), min(remaining, 1.0))
        conn.busy += 1
        try:
            yield conn
        finally:
            conn.busy -= 1
            conn.touch()
            async with slot.changed:
                slot.changed.notify()

    async def discard(self, conn: SSHConnection) -> None:
        """Drop a connection found dead (or broken); the next call opens a new one."""
        slot = self._slots.get(conn.target.pool_key)
        if slot is not None and conn in slot.conns:
            slot.conns.remove(conn)
        log.info("SSH connection to %s dropped; it will be reopened on next use", conn.target.label)
        await conn.aclose()

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a background task (a socket bridge) until it ends; :meth:`aclose` cancels what is left."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _slot(self, target: SSHTarget) -> _Slot:
        slot = self._slots.get(target.pool_key)
        if slot is None:
            slot = self._slots[target.pool_key] = _Slot(target)
        return slot

    # -- health ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters and open connections per ``user@host:port`` (no credential in it)."""
        hosts: dict[str, int] = {}
        for slot in self._slots.values():
            n = len(slot.live())
            if n:
                hosts[slot.target.label] = hosts.get(slot.target.label, 0) + n
        return {**self.stats.snapshot(), "open_connections": sum(hosts.values()), "hosts": hosts}

    # -- connecting ------------------------------------------------------------------------------

    async def _open(self, target: SSHTarget) -> SSHConnection:
        """A new authenticated connection (see :meth:`Connector.open` for what it raises)."""
        conn, client = await self.connector.open(target)
        self._start_reaper()
        return SSHConnection(conn, client, target, self.stats)

    # -- idle connections ------------------------------------------------------------------------

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="ssh-pool-reaper")

    async def _reap(self) -> None:
        period = max(0.5, min(self.limits.idle_timeout / 4, 30.0))
        while True:
            await asyncio.sleep(period)
            await self.close_idle()

    async def close_idle(self) -> int:
        """Close connections unused for the idle time (none while a call holds their target)."""
        now = asyncio.get_running_loop().time()
        closed = 0
        for key, slot in list(self._slots.items()):
            if not slot.conns and not slot.users and slot.pending is None:
                del self._slots[key]  # e.g. the slot of a wrong password
                continue
            for conn in list(slot.conns):
                idle = not conn.busy and not slot.users and now - conn.last_used >= self.limits.idle_timeout
                if not conn.alive or idle:
                    slot.conns.remove(conn)
                    if idle:
                        log.info("closing SSH connection to %s (idle)", conn.target.label)
                    await conn.aclose()
                    closed += 1
        return closed

    async def aclose(self) -> None:
        """Close every connection (running VMs keep running)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            if slot.pending is not None:
                slot.pending.cancel()
                await asyncio.gather(slot.pending, return_exceptions=True)
            for conn in slot.conns:
                await conn.aclose()
