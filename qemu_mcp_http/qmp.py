"""QMP sessions on a VM's socket, through the host seam (local socket or SSH channel).

qemu.qmp has no timeouts of its own, so every call here is bounded by
``asyncio.wait_for``; its errors are mapped into :mod:`.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from .errors import OperationTimeout, QMPFailure, QMPUnavailable
from .hosts.base import Host

__all__ = ["QMPSession", "qmp_session"]

log = logging.getLogger(__name__)


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
        from qemu.qmp import Runstate

        return self._client.runstate == Runstate.RUNNING


@contextlib.asynccontextmanager
async def qmp_session(host: Host, socket_path: str, vm: str, timeout: float) -> AsyncIterator[QMPSession]:
    """Connect to the QMP socket of ``vm`` on ``host``; disconnect on exit.

    :raise QMPUnavailable: nothing answers on the socket (QEMU not running, stale socket).
    :raise OperationTimeout: the greeting or capabilities negotiation hung.
    """
    sock = await host.open_unix_socket(socket_path, timeout=timeout)
    client = QMPClient(vm)
    try:
        try:
            await asyncio.wait_for(client.connect(sock), timeout)
        except TimeoutError as exc:
            raise OperationTimeout(f"QMP of VM {vm} did not greet within {timeout:g} s (is QEMU hung?)") from exc
        except (QMPError, OSError) as exc:
            raise QMPUnavailable(f"QMP of VM {vm} refused the session: {exc}") from exc
        yield QMPSession(client, vm, timeout)
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), timeout)
        except Exception:
            log.debug("QMP disconnect of %s failed", vm, exc_info=True)
        sock.close()
