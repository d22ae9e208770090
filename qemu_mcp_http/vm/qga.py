"""The QEMU guest agent on the VM's ``qga.sock`` (through the host seam), one shared connection per VM.

The agent speaks line-delimited JSON with no greeting and no request ids, one client at a time (QEMU's
chardev serves one connection): so every caller of a VM (monitoring, ``vm_guest``, ``stop``) shares one
connection and takes turns, like QMP (:class:`.qmp.QMPPool`).  ``guest-sync`` with a random id flushes
whatever an earlier client left in the channel.

The agent runs inside the guest: everything it answers is the guest's to forge, and is treated as input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from ..errors import GuestAgentError, GuestAgentUnavailable, SocketUnavailable
from ..hosts.base import Host

__all__ = ["AGENT_LINE_LIMIT", "AgentPool", "GuestAgent", "guest_agent"]

log = logging.getLogger(__name__)

#: Longest answer line read from an agent (guest-exec-status carries base64 output: the caller bounds
#: what it asks for, this bounds what a hostile guest may send).
AGENT_LINE_LIMIT = 32 << 20
#: A shared agent connection unused this long is closed.
AGENT_IDLE_SECONDS = 2.0


class GuestAgent:
    """One connection to a guest agent; :meth:`execute` is called by one task at a time (see AgentPool)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self._synced = False

    async def _send(self, message: dict[str, Any]) -> None:
        self._writer.write(json.dumps(message).encode() + b"\n")
        await asyncio.wait_for(self._writer.drain(), self.timeout)

    async def _reply(self, timeout: float) -> dict[str, Any]:
        line = await asyncio.wait_for(self._reader.readline(), timeout)
        if not line:
            raise GuestAgentUnavailable("the guest agent channel closed (the VM stopped?)")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise GuestAgentUnavailable("the guest agent answered something that is not a JSON object")
        return reply

    async def _sync(self, timeout: float) -> None:
        token = secrets.randbelow(2**31)
        await self._send({"execute": "guest-sync", "arguments": {"id": token}})
        async with asyncio.timeout(timeout):  # a guest may answer forever with other lines
            while (await self._reply(timeout)).get("return") != token:
                pass
        self._synced = True

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one agent command and return its ``return`` value.

        :raise GuestAgentUnavailable: the agent did not answer (not installed or not running in the guest).
        :raise GuestAgentError: the agent answered with an error.
        """
        limit = self.timeout if timeout is None else timeout
        try:
            if not self._synced:
                await self._sync(limit)
            message: dict[str, Any] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            await self._send(message)
            reply = await self._reply(limit)
        except TimeoutError as exc:
            self._synced = False  # a late answer may still come: sync again before the next command
            raise GuestAgentUnavailable(
                f"the guest agent did not answer '{command}' within {limit:g} s; "
                "is qemu-guest-agent installed and running in the guest?"
            ) from exc
        except (ValueError, OSError, RecursionError) as exc:
            raise GuestAgentUnavailable(f"the guest agent channel failed: {type(exc).__name__}") from exc
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise GuestAgentError(f"the guest agent refused '{command}': {str(error.get('desc'))[:500]}")
        return reply.get("return")

    async def send_only(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        """Send a command the agent does not answer when it works (``guest-shutdown``)."""
        try:
            if not self._synced:
                await self._sync(self.timeout)
            await self._send({"execute": command, **({"arguments": arguments} if arguments else {})})
        except (TimeoutError, ValueError, OSError) as exc:
            raise GuestAgentUnavailable(f"the guest agent did not take '{command}'") from exc
        self._synced = False  # an error answer, if any, is left for the next sync to flush

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


async def _connect(host: Host, path: str, timeout: float) -> GuestAgent:
    try:
        sock = await host.open_unix_socket(path, timeout=timeout)
    except SocketUnavailable as exc:
        raise GuestAgentUnavailable(f"no guest agent channel at {path} on {host.name}: {exc.reason}") from exc
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=AGENT_LINE_LIMIT)
    return GuestAgent(reader, writer, timeout)


@contextlib.asynccontextmanager
async def guest_agent(host: Host, path: str, timeout: float) -> AsyncIterator[GuestAgent]:
    """A private connection for one-off use (tests, probes)."""
    agent = await _connect(host, path, timeout)
    try:
        yield agent
    finally:
        await agent.aclose()


class AgentPool:
    """One shared agent connection per VM socket; callers hold it in turn, for one exchange or several."""

    def __init__(self, idle_timeout: float = AGENT_IDLE_SECONDS) -> None:
        self.idle_timeout = idle_timeout
        self._agents: dict[tuple[str, str], GuestAgent] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._idle: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def session(self, host: Host, path: str, timeout: float) -> AsyncIterator[GuestAgent]:
        """The VM's agent connection, held by this caller until the block ends.

        :raise GuestAgentUnavailable: no agent channel (the VM is stopped), or another caller held it longer
            than ``timeout``.
        """
        key = (host.identity, path)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with asyncio.timeout(timeout):
                await lock.acquire()
        except TimeoutError:
            raise GuestAgentUnavailable(f"the guest agent of {path} stayed busy for more than {timeout:g} s") from None
        try:
            if handle := self._idle.pop(key, None):
                handle.cancel()
            agent = self._agents.get(key)
            if agent is None:
                agent = self._agents[key] = await _connect(host, path, timeout)
            agent.timeout = timeout
            try:
                yield agent
            except GuestAgentUnavailable:
                await self._drop(key)  # a broken or unsynced channel is not handed to the next caller
                raise
            if key in self._agents:
                self._idle[key] = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, key)
        finally:
            lock.release()

    def _expire(self, key: tuple[str, str]) -> None:
        self._idle.pop(key, None)
        lock = self._locks.get(key)
        if lock is not None and lock.locked():
            return
        agent = self._agents.pop(key, None)
        if agent is not None:
            task = asyncio.ensure_future(agent.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _drop(self, key: tuple[str, str]) -> None:
        agent = self._agents.pop(key, None)
        if agent is not None:
            await agent.aclose()

    async def forget(self, host: Host, path: str) -> None:
        """Drop the connection of a VM that stopped."""
        key = (host.identity, path)
        if handle := self._idle.pop(key, None):
            handle.cancel()
        await self._drop(key)

    async def aclose(self) -> None:
        for handle in self._idle.values():
            handle.cancel()
        self._idle.clear()
        agents, self._agents = list(self._agents.values()), {}
        for agent in agents:
            await agent.aclose()
        await asyncio.gather(*self._closing, return_exceptions=True)
