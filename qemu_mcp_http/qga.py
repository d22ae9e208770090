"""A minimal QEMU guest agent client on the VM's ``qga.sock`` (through the host seam).

The agent speaks line-delimited JSON with no greeting; ``guest-sync`` with a
random id flushes whatever an earlier client left in the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from .errors import OperationTimeout, QMPFailure, QMPUnavailable
from .hosts.base import Host

__all__ = ["GuestAgent", "guest_agent"]


class GuestAgent:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._synced = False

    async def _send(self, message: dict[str, Any]) -> None:
        self._writer.write(json.dumps(message).encode() + b"\n")
        await asyncio.wait_for(self._writer.drain(), self._timeout)

    async def _reply(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self._reader.readline(), self._timeout)
        if not line:
            raise QMPUnavailable("guest agent channel closed")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """:raise OperationTimeout: the agent did not answer (not running in the guest)."""
        try:
            if not self._synced:
                token = secrets.randbelow(2**31)
                await self._send({"execute": "guest-sync", "arguments": {"id": token}})
                while (await self._reply()).get("return") != token:
                    pass
                self._synced = True
            message: dict[str, Any] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            await self._send(message)
            reply = await self._reply()
        except TimeoutError as exc:
            raise OperationTimeout(f"guest agent did not answer '{command}' within {self._timeout:g} s") from exc
        except (ValueError, OSError) as exc:
            raise QMPUnavailable(f"guest agent channel failed: {exc}") from exc
        if "error" in reply:
            raise QMPFailure(f"guest agent '{command}' failed: {reply['error'].get('desc')}")
        return reply.get("return")


@contextlib.asynccontextmanager
async def guest_agent(host: Host, path: str, timeout: float) -> AsyncIterator[GuestAgent]:
    sock = await host.open_unix_socket(path, timeout=timeout)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        yield GuestAgent(reader, writer, timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), timeout)
