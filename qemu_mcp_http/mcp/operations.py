"""State-changing calls run to their end in tasks of the server's, even when their client goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["OPERATIONS_GRACE_S", "Operations"]

#: How long a shutdown waits for state-changing operations under way (a stop may wait for a guest).
OPERATIONS_GRACE_S = 60.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class Operations:
    """The operations under way; :meth:`drain` lets them finish (bounded) when the server stops."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task[Any]] = set()

    def detach(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` in a task of the server's: cancelling the caller does not cancel it."""
        task = asyncio.get_running_loop().create_task(work)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    async def drain(self, grace: float = OPERATIONS_GRACE_S) -> None:
        """Wait up to ``grace`` seconds for the operations under way, then cancel what is left."""
        if not self.running:
            return
        pending = list(self.running)
        log.info("waiting up to %g s for %d operation(s) under way", grace, len(pending))
        _, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
