"""Concurrent identical reads share one run (``list_vms`` of one vm_dir by many clients at once)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar, cast

__all__ = ["Coalescer"]

T = TypeVar("T")


class Coalescer:
    """Concurrent identical reads share one run that began after each of them asked.

    A caller never gets an answer read before it called: if a run is under way, callers
    wait for it to end and share the next one. So 20 concurrent ``list_vms`` of one
    ``vm_dir`` cost at most two remote scans, and no extra channels or connections.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}
        self._next: dict[Hashable, asyncio.Future[Any]] = {}

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        shared = self._next.get(key)
        if shared is None:
            shared = self._next[key] = asyncio.ensure_future(self._after_current(key, fn))
            # Retrieved here too, so a run whose callers all gave up logs no "exception never retrieved".
            shared.add_done_callback(lambda f: f.cancelled() or f.exception())
        # shield: one caller giving up (cancelled) must not cancel the others' run.
        return cast(T, await asyncio.shield(shared))

    async def _after_current(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        current = self._running.get(key)
        if current is not None:
            await asyncio.wait([current])  # it began before some of our callers asked
        me = self._next.pop(key)
        self._running[key] = me
        try:
            return await fn()
        finally:
            if self._running.get(key) is me:
                del self._running[key]
