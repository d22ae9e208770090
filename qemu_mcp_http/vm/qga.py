"""The QEMU guest agent on the VM's ``qga.sock`` (through the host seam), one shared connection per VM.

The agent speaks line-delimited JSON with no greeting and no request ids, one client at a time (QEMU's
chardev serves one connection): so every caller of a VM (monitoring, ``vm_guest``, ``stop``) shares one
connection and takes turns, like QMP (:class:`.qmp.QMPPool`).  ``guest-sync`` with a random id flushes
whatever an earlier client left in the channel.

The agent runs inside the guest: everything it answers is the guest's to forge, and is treated as input.
An answer is read in pieces by :class:`ReplyScanner` within the :class:`ReplyLimits` of its command (what
the command needs: a file chunk's base64 for ``guest-file-read``, ``--guest-output-limit`` for
``guest-exec-status``, 1 MiB for the rest): a longer line or one with more JSON elements than the limit is
refused (:class:`.errors.GuestAgentReplyRefused`) and the channel dropped, and each JSON string is kept only
up to what the command can use, so that ``json.loads`` only ever sees a bounded text of bounded structure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..errors import GuestAgentError, GuestAgentReplyRefused, GuestAgentUnavailable, SocketUnavailable
from ..hosts.base import Host

__all__ = [
    "DEFAULT_LIMITS",
    "AgentPool",
    "GuestAgent",
    "ReplyLimits",
    "ReplyScanner",
    "base64_length",
    "guest_agent",
]

log = logging.getLogger(__name__)

#: A shared agent connection unused this long is closed.
AGENT_IDLE_SECONDS = 2.0
#: What qemu-ga itself captures of a command's stdout and of its stderr (GUEST_EXEC_MAX_OUTPUT).
AGENT_EXEC_OUTPUT_MAX = 16 << 20
#: The answer around the data: keys, numbers, other small fields.
FRAMING_BYTES = 64 << 10
#: Bytes read from the agent's socket at a time.
READ_CHUNK = 64 << 10


def base64_length(size: int) -> int:
    """Characters of the base64 text of ``size`` bytes."""
    return (size + 2) // 3 * 4


@dataclass(frozen=True)
class ReplyLimits:
    """What one answer line of the agent may be.

    ``line_bytes``: the longest line read at all; ``kept_bytes``: the most kept of it for parsing (strings
    cut to ``string_bytes`` each); ``elements``: JSON strings, keys, separators and containers at most.
    """

    line_bytes: int = 1 << 20
    kept_bytes: int = 1 << 20
    string_bytes: int = 64 << 10
    elements: int = 50_000

    @classmethod
    def exec_status(cls, output_limit: int) -> ReplyLimits:
        """``guest-exec-status``: stdout and stderr as qemu-ga sends them (up to its own 16 MiB each) are read,
        but only ``output_limit`` bytes of each are kept (the caller cuts there and says so)."""
        string = base64_length(output_limit) + 8  # more than the caller keeps: it sees the output was cut
        line = 2 * base64_length(max(output_limit, AGENT_EXEC_OUTPUT_MAX)) + FRAMING_BYTES
        return cls(line_bytes=line, kept_bytes=2 * string + FRAMING_BYTES, string_bytes=string, elements=1000)

    @classmethod
    def file_read(cls, count: int) -> ReplyLimits:
        """``guest-file-read`` of ``count`` bytes: their base64, and the framing."""
        string = base64_length(count) + 8
        return cls(line_bytes=string + FRAMING_BYTES, kept_bytes=string + FRAMING_BYTES, string_bytes=string,
                   elements=1000)  # fmt: skip


#: The limits of an answer whose command sets none (guest-info, guest-get-fsinfo, ...: a few KiB in practice).
DEFAULT_LIMITS = ReplyLimits()

#: Where a string's run of ordinary bytes stops (its end, an escape, or a raw newline, which ends the line).
_STRING_STOP = re.compile(rb'["\\\n]')
#: Where a run of structure stops: a string begins, or the line ends.
_STRUCTURE_STOP = re.compile(rb'["\n]')


class ReplyScanner:
    """One answer line fed in pieces, kept within :class:`ReplyLimits`; pure (no I/O).

    :meth:`feed` returns how much of a piece belongs to the line once its newline came (the rest is the next
    line's), else ``None``; :meth:`text` is then the line to parse, every string cut to ``string_bytes``
    (at a whole character and a whole escape, so the text stays JSON).

    :raise GuestAgentReplyRefused: the line is longer, keeps more, or holds more elements than allowed.
    """

    def __init__(self, limits: ReplyLimits, command: str) -> None:
        self.limits = limits
        self.command = command
        self.read = 0
        self.elements = 0
        self.truncated_strings = 0
        self._kept = bytearray()
        self._in_string = False
        self._escaped = False  # the previous byte of the string was a backslash
        self._string_kept = 0
        self._string_full = False

    def feed(self, piece: bytes) -> int | None:
        i, end = 0, len(piece)
        while i < end:
            if self._in_string:
                if self._escaped:  # the escaped character itself
                    self._keep_in_string(piece[i : i + 1], escape=True)
                    self._escaped = False
                    i += 1
                    continue
                stop = _STRING_STOP.search(piece, i)
                j = stop.start() if stop is not None else end
                self._keep_in_string(piece[i:j])
                if stop is None:
                    i = end
                    break
                byte = piece[j]
                if byte == 0x0A:  # a raw newline: the line ends (unterminated string: json.loads refuses it)
                    return self._ended(j)
                if byte == 0x22:  # the string ends
                    self._kept += b'"'
                    self._in_string = False
                else:  # a backslash: kept with the character after it, or not at all
                    self._escaped = True
                i = j + 1
                continue
            stop = _STRUCTURE_STOP.search(piece, i)
            j = stop.start() if stop is not None else end
            self._structure(piece[i:j])
            if stop is None:
                break
            if piece[j] == 0x0A:
                return self._ended(j)
            self._count(1)
            self._kept += b'"'
            self._in_string, self._string_kept, self._string_full = True, 0, False
            i = j + 1
        self._grow(end)
        return None

    def text(self) -> bytes:
        return bytes(self._kept)

    def _ended(self, newline_at: int) -> int:
        self._grow(newline_at + 1)
        return newline_at + 1

    def _grow(self, consumed: int) -> None:
        self.read += consumed
        if self.read > self.limits.line_bytes:
            raise self._refused(f"is longer than {self.limits.line_bytes} bytes")
        if len(self._kept) > self.limits.kept_bytes:
            raise self._refused(f"holds more than {self.limits.kept_bytes} bytes besides long strings")

    def _structure(self, run: bytes) -> None:
        if run:
            self._count(run.count(b",") + run.count(b":") + run.count(b"[") + run.count(b"{"))
            self._kept += run
            if len(self._kept) > self.limits.kept_bytes:
                raise self._refused(f"holds more than {self.limits.kept_bytes} bytes besides long strings")

    def _keep_in_string(self, run: bytes, escape: bool = False) -> None:
        if self._string_full or not run:
            return
        room = self.limits.string_bytes - self._string_kept
        if escape:  # "\\" + one character, or "\\u" and the 4 hex digits that follow (ordinary bytes)
            needed = 6 if run == b"u" else 2
            if needed > room:
                self._cut()
                return
            self._kept += b"\\" + run
            self._string_kept += 2
            return
        if len(run) <= room:
            self._kept += run
            self._string_kept += len(run)
            return
        self._kept += run[:room]
        self._string_kept += room
        self._cut()

    def _cut(self) -> None:
        """The string is full: what follows of it is dropped, and a UTF-8 character whose bytes did not all
        fit is taken back (a ``\\uXXXX`` escape is always kept whole: room for 6 was checked before its
        ``\\u``, and its digits are ASCII)."""
        self._string_full = True
        self.truncated_strings += 1
        tail = min(4, self._string_kept)
        for back in range(1, tail + 1):
            byte = self._kept[-back]
            if byte < 0x80:
                return
            if byte >= 0xC0:  # the lead byte: its character needs 2, 3 or 4 bytes
                needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
                if needed > back:
                    del self._kept[-back:]
                    self._string_kept -= back
                return

    def _count(self, n: int) -> None:
        self.elements += n
        if self.elements > self.limits.elements:
            raise self._refused(f"holds more than {self.limits.elements} JSON elements")

    def _refused(self, why: str) -> GuestAgentReplyRefused:
        return GuestAgentReplyRefused(
            f"the guest agent's answer to '{self.command}' {why}, more than the command needs; the channel was "
            "dropped (the agent in the guest is broken or hostile)"
        )


class GuestAgent:
    """One connection to a guest agent; :meth:`execute` is called by one task at a time (see AgentPool)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self._synced = False
        #: Bytes read after the end of the last line (the start of the next one).
        self._pending = b""

    async def _send(self, message: dict[str, Any]) -> None:
        self._writer.write(json.dumps(message).encode() + b"\n")
        await asyncio.wait_for(self._writer.drain(), self.timeout)

    async def _line(self, scanner: ReplyScanner, timeout: float) -> bytes:
        """The next answer line, read through ``scanner`` (bounded) within ``timeout``.

        :raise GuestAgentReplyRefused: the line is beyond the scanner's limits.
        :raise GuestAgentUnavailable: the channel closed.
        """
        async with asyncio.timeout(timeout):
            piece, self._pending = self._pending, b""
            while True:
                if piece:
                    used = scanner.feed(piece)
                    if used is not None:
                        self._pending = piece[used:]
                        return scanner.text()
                piece = await self._reader.read(READ_CHUNK)
                if not piece:
                    raise GuestAgentUnavailable("the guest agent channel closed (the VM stopped?)")

    async def _reply(self, command: str, timeout: float, limits: ReplyLimits) -> dict[str, Any]:
        line = await self._line(ReplyScanner(limits, command), timeout)
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise GuestAgentUnavailable("the guest agent answered something that is not a JSON object")
        return reply

    async def _sync(self, timeout: float) -> None:
        token = secrets.randbelow(2**31)
        await self._send({"execute": "guest-sync", "arguments": {"id": token}})
        async with asyncio.timeout(timeout):  # a guest may answer forever with other lines
            while True:
                try:
                    if (await self._reply("guest-sync", timeout, DEFAULT_LIMITS)).get("return") == token:
                        break
                except (ValueError, RecursionError):
                    continue  # what an earlier client left half read: the sync is there to flush it
        self._synced = True

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        limits: ReplyLimits | None = None,
    ) -> Any:
        """Run one agent command and return its ``return`` value; the answer is read within ``limits``
        (default: :data:`DEFAULT_LIMITS`, 1 MiB).

        :raise GuestAgentReplyRefused: the answer was beyond ``limits`` (the channel is to be dropped).
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
            reply = await self._reply(command, limit, limits or DEFAULT_LIMITS)
        except TimeoutError as exc:
            self._synced = False  # a late answer may still come: sync again before the next command
            raise GuestAgentUnavailable(
                f"the guest agent did not answer '{command}' within {limit:g} s; "
                "is qemu-guest-agent installed and running in the guest?"
            ) from exc
        except GuestAgentReplyRefused:
            self._synced = False
            raise
        except (ValueError, OSError, RecursionError) as exc:
            self._synced = False
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
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=READ_CHUNK)
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
