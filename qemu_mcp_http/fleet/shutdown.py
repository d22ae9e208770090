"""Shutdown of the server as open-ended calls see it.

uvicorn's graceful shutdown waits for in-flight requests; a ``monitor_vm_status`` with
``count=0`` never ends by itself and would hold the whole window. The signal handler
triggers :class:`ShutdownSignal`, and such calls end at once with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import ServerShuttingDown

__all__ = ["ShutdownSignal"]

T = TypeVar("T")


class ShutdownSignal:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the server's loop, so that :meth:`trigger` may be called from a signal handler."""
        self._loop = loop

    def trigger(self) -> None:
        """Begin the shutdown; safe from signal handlers and other threads."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._event.set)

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    async def cancel_on_shutdown(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work``; if the server begins to shut down first, cancel it and raise ServerShuttingDown."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Our own cancellation (the client cancelled) reaches the work too.
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled() and self.triggered:
            raise ServerShuttingDown("the server is shutting down; the VM keeps running; call again once it is back")
        return task.result()
