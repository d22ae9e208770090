"""The serial console of a VM (``vm_console`` read, send, wait; the screen is :mod:`.screen`).

The serial console is a unix-socket chardev whose every byte QEMU also appends to ``console.log``: reads and
waits follow the log (by byte offset, so a client can follow it), input goes to the socket (one client at a
time, as QEMU serves it; the connection is held only to write).  Everything the console shows is written by the
guest: sizes are bounded, and a client's regular expression is checked for size before it is compiled and
searched off the event loop, in the server's CPU pool, within the call's timeout and CPU budgets
(:mod:`.pattern`, :mod:`..cpu`), so that neither side can make the server spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import regex

from ..errors import InvalidInput, LimitExceeded, SocketUnavailable, VMStateError
from ..vm.spec import validate_name
from ..vm.vmdir import VMDir
from .pattern import MAX_LINE_BYTES, LineSearch, compile_pattern, search_lines
from .text import decode_console, strip_terminal_escapes, tail_lines

__all__ = ["ConsoleWaitTimeout", "SerialConsole"]

Progress = Callable[[float, str], Awaitable[None]]
#: What ended a search early: the call's time, its CPU budget, the client's budget (``None``: nothing).
StopReason = Literal["time", "call", "client"] | None
#: The most a read returns, and the most text one send writes.
MAX_READ_BYTES = 256 * 1024
MAX_SEND_BYTES = 64 * 1024
#: How long a send stays connected: a base, plus the time the guest's UART takes for the bytes.
LINGER_BASE_S = 0.3
LINGER_BYTES_PER_S = 5000


class ConsoleWaitTimeout(VMStateError):
    """The pattern did not appear in time; ``details`` hold the console's last lines."""


class SerialConsole:
    """read, send, wait."""

    def __init__(self, vms: VMDir) -> None:
        self.vms = vms

    async def console_read(self, name: str, lines: int | None, offset: int | None, raw: bool) -> dict[str, Any]:
        """The console's last ``lines`` lines (default 50), or everything from byte ``offset`` (at most
        ``MAX_READ_BYTES``) with the offset to ask for next. A log that shrank (it never does while QEMU
        appends) restarts at 0, and ``restarted`` says so."""
        definition = await self.vms.store.load(validate_name(name))
        log = self.vms.store.paths(definition.name).console_log
        timeout = self.vms.settings.command_timeout
        if offset is not None:
            if isinstance(offset, bool) or offset < 0:
                raise InvalidInput("offset", f"{offset!r} must be a byte offset >= 0 (0: the start of the log)")
            data, size = await self.vms.host.read_range(log, offset=offset, length=MAX_READ_BYTES, timeout=timeout)
            restarted = offset > size
            if restarted:
                data, size = await self.vms.host.read_range(log, offset=0, length=MAX_READ_BYTES, timeout=timeout)
                offset = 0
            text = decode_console(data)
            return {
                "text": text if raw else strip_terminal_escapes(text),
                "offset": offset,
                "next_offset": offset + len(data),
                "size": size,
                "restarted": restarted,
            }
        count = 50 if lines is None else lines
        if isinstance(count, bool) or not 1 <= count <= 10000:
            raise InvalidInput("lines", f"{lines!r} must be 1 .. 10000")
        data, size = await self.vms.host.read_range(log, offset=None, length=MAX_READ_BYTES, timeout=timeout)
        text = decode_console(data)
        return {
            "text": tail_lines(text if raw else strip_terminal_escapes(text), count),
            "next_offset": size,
            "size": size,
        }

    async def console_send(self, name: str, text: str) -> dict[str, Any]:
        """Write ``text`` to the serial console; a newline is sent as Enter (carriage return), as a terminal does."""
        if not isinstance(text, str) or not text:
            raise InvalidInput("text", "give the text to send, e.g. 'uname -a\\n' (\\n is Enter)")
        data = text.replace("\r\n", "\n").replace("\n", "\r").encode()
        if len(data) > MAX_SEND_BYTES:
            raise InvalidInput("text", f"is longer than {MAX_SEND_BYTES} bytes; send it in parts")
        definition = await self.vms.load_running(name)
        path = self.vms.store.paths(definition.name).console_socket
        timeout = self.vms.settings.qmp_timeout
        async with self.vms.shared.console_lock(self.vms.host.identity, path):
            try:
                sock = await self.vms.host.open_unix_socket(path, timeout=timeout)
            except SocketUnavailable as exc:
                raise VMStateError(
                    f"the serial console of VM {definition.name} takes no input ({exc.reason}); it may be held by "
                    "another client, or the VM was started before consoles took input (restart it)"
                ) from exc
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            try:
                writer.write(data)
                await asyncio.wait_for(writer.drain(), timeout)
                await _linger(reader, len(data))
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
        return {"bytes_sent": len(data)}

    async def console_wait(
        self,
        name: str,
        pattern: str,
        offset: int | None,
        timeout: float,
        progress: Progress | None = None,
        client: str = "local",
    ) -> dict[str, Any]:
        """Until ``pattern`` (a regular expression) matches a line of the console (escape sequences stripped;
        the line being written counts too, so a prompt without a newline is found), from byte ``offset`` or from
        now. Returns the match, the offset of its line and the lines around it.

        ``timeout`` bounds the whole call, searching included.  The search runs in the server's CPU pool
        (:mod:`..cpu`), within ``--pattern-cpu-per-call`` CPU seconds and the budget of ``client``.

        :raise InvalidInput: a bad pattern, offset or timeout; a pattern that took too long on one line, or
            spent the call's CPU budget.
        :raise LimitExceeded: ``client`` has spent its CPU budget for patterns.
        :raise ConsoleWaitTimeout: no match within ``timeout`` (details: the console's last lines).
        """
        compiled = self._checked(pattern, offset, timeout)
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline, next_report, delay = began + timeout, began, 0.05
        definition = await self.vms.store.load(validate_name(name))
        log = self.vms.store.paths(definition.name).console_log
        io_timeout = self.vms.settings.command_timeout
        if offset is None:
            _, offset = await self.vms.host.read_range(log, offset=None, length=0, timeout=io_timeout)
        position, carry = offset, b""
        seen: list[str] = []
        cpu_spent, searched_carry = 0.0, False
        per_call = self.vms.settings.pattern_cpu_per_call
        while True:
            read_timeout = min(io_timeout, max(1.0, deadline - loop.time()))  # the call's timeout bounds it all
            data, size = await self.vms.host.read_range(
                log, offset=position, length=MAX_READ_BYTES, timeout=read_timeout
            )
            if size < position:  # the log started again (QEMU restarted without logappend)
                position, carry, searched_carry = 0, b"", False
                continue
            start = position - len(carry)
            buffer = carry + data
            position += len(data)
            *complete, carry = buffer.split(b"\n")
            if len(carry) > MAX_LINE_BYTES:
                complete.append(carry)
                carry = b""
            lines = [*complete, carry] if data or not searched_carry else []
            searched_carry = True
            if lines:
                found, spent, stop = await self._search(compiled, lines, deadline, per_call - cpu_spent, client)
                cpu_spent += spent
                if found.index is not None:
                    match = _match(found, lines, start, len(complete), seen)
                    return {**match, "waited_seconds": round(loop.time() - began, 3)}
                self._stop_early(stop, pattern, client)
                seen = [*seen, *found.tail[:-1]][-5:]  # the last line searched is the one being written
            now = loop.time()
            if now >= deadline:
                slow = f"; searching took {cpu_spent:.1f} s of CPU: the pattern is slow" if cpu_spent > 1 else ""
                raise ConsoleWaitTimeout(
                    f"{pattern!r} did not appear on the console of VM {definition.name} within {timeout:g} s{slow} "
                    "(details.console_tail: its last lines)",
                    {
                        "console_tail": await self.vms.console_tail(definition.name),
                        "next_offset": position,
                        "search_cpu_seconds": round(cpu_spent, 3),
                    },
                )
            if progress is not None and now >= next_report:
                await progress(now - began, f"waiting for {pattern[:80]!r}")
                next_report = now + 2.0
            await asyncio.sleep(min(delay, max(0.0, deadline - now)))
            delay = 0.05 if data else min(delay * 1.5, 0.25)

    def _checked(self, pattern: str, offset: int | None, timeout: float) -> regex.Pattern[str]:
        """The compiled pattern, once the pattern, the offset and the timeout are known good.

        :raise InvalidInput: one of them is not.
        """
        compiled = compile_pattern(pattern)
        limit = self.vms.settings.max_wait_timeout
        if not math.isfinite(timeout) or not 0 < timeout <= limit:
            raise InvalidInput("timeout", f"{timeout!r} must be seconds above 0, at most {limit:g}")
        if offset is not None and (isinstance(offset, bool) or offset < 0):
            raise InvalidInput("offset", f"{offset!r} must be a byte offset >= 0")
        return compiled

    def _stop_early(self, stop: StopReason, pattern: str, client: str) -> None:
        """:raise InvalidInput: the search spent the call's CPU budget. :raise LimitExceeded: the client's."""
        s = self.vms.settings
        if stop == "call":
            raise InvalidInput(
                "pattern",
                f"searching the console for {pattern[:80]!r} used this call's CPU budget ({s.pattern_cpu_per_call:g} "
                "s, --pattern-cpu-per-call, counted as the search's running time); simplify the pattern",
            )
        if stop == "client":
            raise LimitExceeded(
                f"client {client} used its CPU budget for console patterns ({s.pattern_cpu_per_client:g} s per "
                "minute) during this wait; retry later, or use a simpler pattern"
            )

    async def _search(
        self, compiled: regex.Pattern[str], lines: list[bytes], deadline: float, call_left: float, client: str
    ) -> tuple[LineSearch, float, StopReason]:
        """Search ``lines`` in the CPU pool within what is left of the call's time, its CPU budget and the
        client's; says which of them stopped the search, if one did."""
        time_left = deadline - asyncio.get_running_loop().time()
        if time_left <= 0:
            return LineSearch(stopped=True), 0.0, "time"
        if call_left <= 0:
            return LineSearch(stopped=True), 0.0, "call"
        client_left = self.vms.shared.cpu.budgets.level(client)
        try:
            found, spent = await self.vms.shared.cpu.run(
                functools.partial(search_lines, compiled, lines),
                seconds=min(time_left, call_left),
                client=client,
                what="console patterns",
            )
        except TimeoutError:  # no worker came free in time: the call's time is up
            return LineSearch(stopped=True), 0.0, "time"
        if not found.stopped:
            return found, spent, None
        least = min(time_left, call_left, client_left)
        return found, spent, "time" if least == time_left else "call" if least == call_left else "client"


def _match(found: LineSearch, lines: list[bytes], start: int, complete: int, seen: list[str]) -> dict[str, Any]:
    """The answer of a wait whose search matched line ``found.index`` of ``lines`` (read from byte ``start``;
    the first ``complete`` end with a newline): the match, where its line is, and the lines before it."""
    assert found.index is not None
    line = lines[found.index]
    at = start + sum(len(earlier) + 1 for earlier in lines[: found.index])
    return {
        "match": found.match,
        "groups": found.groups,
        "offset": at,
        "next_offset": at + len(line) + (1 if found.index < complete else 0),
        "context": [*[*seen, *found.tail][-5:], found.text[:1000]],
    }


async def _linger(reader: asyncio.StreamReader, size: int) -> None:
    """Stay connected while QEMU feeds what was sent to the guest's UART (a few bytes at a time, as the guest
    reads them): a connection closed at once loses what QEMU had not read yet. Output read meanwhile is
    dropped (console.log has it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_BASE_S + size / LINGER_BYTES_PER_S
    with contextlib.suppress(TimeoutError, OSError):
        while (remaining := deadline - loop.time()) > 0:
            if not await asyncio.wait_for(reader.read(65536), remaining):
                return
