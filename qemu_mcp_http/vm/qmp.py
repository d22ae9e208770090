"""QMP sessions on a VM's socket, through the host seam (local socket or SSH channel).

qemu.qmp has no timeouts of its own, so every call here is bounded by
``asyncio.wait_for``; its errors are mapped into :mod:`..errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from ..errors import OperationTimeout, QMPFailure, QMPUnavailable, SocketUnavailable
from ..hosts.base import Host

__all__ = ["QMPPool", "QMPSession", "qmp_session"]

log = logging.getLogger(__name__)

#: A pooled QMP connection unused this long is closed (see :meth:`QMPPool._expire`).
QMP_IDLE_SECONDS = 2.0


class QMPSession:
    """An open QMP connection with bounded ``execute``."""

    def __init__(self, client: QMPClient, vm: str, timeout: float) -> None:
        self._client = client
        self._vm = vm
        self.timeout = timeout

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        :raise OperationTimeout: no answer within the timeout (the session stays usable).
        :raise QMPFailure: QEMU answered with an error.
        :raise QMPUnavailable: the connection was lost (QEMU exited).
        """
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), limit)
        except TimeoutError as exc:
            raise OperationTimeout(f"QMP '{command}' on VM {self._vm} got no answer within {limit:g} s") from exc
        except ExecuteError as exc:
            raise QMPFailure(f"QMP '{command}' on VM {self._vm} failed: {exc.error.error.desc}") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QMPUnavailable(f"QMP connection to VM {self._vm} lost during '{command}'") from exc

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING


class _Refused(QMPUnavailable):
    """The socket answered, but no QMP session came of it (a hung or stopped QEMU)."""


async def _connect(host: Host, socket_path: str, vm: str, timeout: float) -> QMPClient:
    """A connected QMPClient on the socket of ``vm``.

    :raise QMPUnavailable: nothing answers on the socket (QEMU not running, stale socket).
    :raise OperationTimeout: the greeting or capabilities negotiation hung.
    """
    try:
        sock = await host.open_unix_socket(socket_path, timeout=timeout)
    except SocketUnavailable as exc:
        raise QMPUnavailable(f"no QMP endpoint at {socket_path} on {host.name}: {exc.reason}") from exc
    # qemu.qmp logs its own failures at ERROR; they are ours to report (see QMPPool._note), once per VM.
    client = QMPClient(vm)
    client.logger.setLevel(logging.CRITICAL)
    # We never read events; the default listener would otherwise keep every event for the client's life.
    client.events.event_filter = lambda _event: False
    try:
        await asyncio.wait_for(client.connect(sock), timeout)
    except BaseException as exc:
        await _close(client, vm, timeout)
        sock.close()
        if isinstance(exc, TimeoutError):
            raise OperationTimeout(f"QMP of VM {vm} did not greet within {timeout:g} s (is QEMU hung?)") from exc
        if isinstance(exc, QMPError | OSError):
            raise _Refused(f"QMP of VM {vm} refused the session: {exc}") from exc
        raise
    return client


async def _close(client: QMPClient, vm: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), timeout)
    except Exception:
        log.debug("QMP disconnect of %s failed", vm, exc_info=True)


class QMPPool:
    """One shared QMP connection per VM socket, used by every call at once.

    QEMU's QMP socket serves one client at a time, so concurrent tool calls on one VM
    (list, monitor, start, ...) must share a connection; qemu.qmp multiplexes commands
    on it.  A connection that QEMU closed (the VM stopped) is replaced on next use, and
    one left idle for ``idle_timeout`` is closed, so that other processes get their turn.
    """

    def __init__(self, idle_timeout: float = QMP_IDLE_SECONDS) -> None:
        self.idle_timeout = idle_timeout
        self._clients: dict[tuple[str, str], QMPClient] = {}
        self._connecting: dict[tuple[str, str], asyncio.Lock] = {}
        self._users: dict[tuple[str, str], int] = {}
        self._idle: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        #: Sockets whose QEMU answered but gave no session: warned once, until it answers again.
        self._failing: set[tuple[str, str]] = set()

    @contextlib.asynccontextmanager
    async def session(self, host: Host, socket_path: str, vm: str, timeout: float) -> AsyncIterator[QMPSession]:
        key = (host.identity, socket_path)
        lock = self._connecting.setdefault(key, asyncio.Lock())
        async with lock:
            client = self._clients.get(key)
            if client is None or client.runstate != Runstate.RUNNING:
                if client is not None:
                    self._clients.pop(key, None)
                    await _close(client, vm, timeout)
                try:
                    client = await _connect(host, socket_path, vm, timeout)
                except (OperationTimeout, _Refused) as exc:
                    if key not in self._failing:
                        self._failing.add(key)
                        log.warning("VM %s on %s: %s", vm, host.name, exc.message)
                    raise
                if key in self._failing:
                    self._failing.discard(key)
                    log.info("VM %s on %s: QMP answers again", vm, host.name)
                self._clients[key] = client
        self._users[key] = self._users.get(key, 0) + 1
        if handle := self._idle.pop(key, None):
            handle.cancel()
        try:
            yield QMPSession(client, vm, timeout)
        except QMPUnavailable:
            await self.forget(host, socket_path, timeout)
            raise
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                if key in self._clients:
                    self._idle[key] = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, key)

    def _expire(self, key: tuple[str, str]) -> None:
        """Close a connection nobody used for ``idle_timeout``: another process (a second server on the
        same vm_dir, an operator's qmp-shell) can only reach the VM's QMP while we do not hold it."""
        self._idle.pop(key, None)
        client = None if self._users.get(key) else self._clients.pop(key, None)
        if client is not None:
            task = asyncio.ensure_future(_close(client, key[1], 2.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def forget(self, host: Host, socket_path: str, timeout: float = 1.0) -> None:
        """Drop the connection to ``socket_path`` (its VM stopped or is being restarted)."""
        key = (host.identity, socket_path)
        if handle := self._idle.pop(key, None):
            handle.cancel()
        client = self._clients.pop(key, None)
        if client is not None:
            await _close(client, socket_path, timeout)

    async def aclose(self) -> None:
        for handle in self._idle.values():
            handle.cancel()
        self._idle.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await _close(client, "(shutdown)", 2.0)


@contextlib.asynccontextmanager
async def qmp_session(host: Host, socket_path: str, vm: str, timeout: float) -> AsyncIterator[QMPSession]:
    """A private QMP connection for one-off use (probes, tests); disconnected on exit."""
    client = await _connect(host, socket_path, vm, timeout)
    try:
        yield QMPSession(client, vm, timeout)
    finally:
        await _close(client, vm, timeout)
