"""CPU work whose size a client or a guest decides, kept off the event loop and bounded.

A client's regular expression over a guest's console can cost seconds per line; run on the event loop it would
freeze every other client and ``/healthz``.  Such work runs here instead: in a small pool of worker threads
(:class:`CpuPool`), each piece within a wall-clock allowance that the work checks between its steps
(:class:`Job`), and charged, in CPU seconds measured by the worker thread, to its client's budget (a bucket
that refills over a minute).  One client may hold at most ``workers - 1`` workers (at least one), so another
client always finds one free.

Threads suffice because the work either releases the GIL (the ``regex`` module with ``concurrent=True``) or
is ordinary Python, which gives the GIL up every few milliseconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import LimitExceeded

__all__ = ["ClientBudgets", "CpuPool", "Job"]

T = TypeVar("T")

#: A client's bucket refills completely over this many seconds.
BUDGET_WINDOW_S = 60.0
#: Buckets kept before full ones (clients that spent nothing lately) are forgotten.
MAX_TRACKED_CLIENTS = 1024


@dataclass
class Job:
    """What one piece of work may spend; the work checks :meth:`remaining` between its steps."""

    #: ``time.monotonic()`` by which the work must have stopped.
    deadline: float
    #: Set when nobody waits for the answer any more (the call was cancelled or timed out).
    cancelled: threading.Event = field(default_factory=threading.Event)

    def remaining(self) -> float:
        """Seconds the work may still run (0 once cancelled or past the deadline)."""
        if self.cancelled.is_set():
            return 0.0
        return max(0.0, self.deadline - time.monotonic())


class ClientBudgets:
    """CPU seconds per client: a bucket of ``capacity`` seconds that refills in :data:`BUDGET_WINDOW_S`.

    Thread-safe: workers charge it when they finish.
    """

    def __init__(self, capacity: float, window: float = BUDGET_WINDOW_S) -> None:
        self.capacity = capacity
        self.rate = capacity / window
        self._lock = threading.Lock()
        self._levels: dict[str, tuple[float, float]] = {}  # client -> (level, when)

    def level(self, client: str) -> float:
        """Seconds ``client`` may spend now (negative: it overdrew, and waits until the bucket refills)."""
        with self._lock:
            return self._refilled(client, time.monotonic())

    def charge(self, client: str, seconds: float) -> None:
        with self._lock:
            now = time.monotonic()
            self._levels[client] = (self._refilled(client, now) - seconds, now)
            if len(self._levels) > MAX_TRACKED_CLIENTS:
                for key in [k for k in self._levels if self._refilled(k, now) >= self.capacity]:
                    del self._levels[key]

    def refill_seconds(self, client: str, needed: float) -> float:
        """How long until ``client`` has ``needed`` seconds again."""
        return max(0.0, needed - self.level(client)) / self.rate

    def _refilled(self, client: str, now: float) -> float:
        level, when = self._levels.get(client, (self.capacity, now))
        return min(self.capacity, level + (now - when) * self.rate)


class CpuPool:
    """A bounded pool of worker threads for CPU work on untrusted input, with per-client budgets."""

    #: The least budget a job starts with: below it, the client is told to come back later.
    MIN_START_S = 0.05

    def __init__(self, workers: int, client_seconds: float) -> None:
        """:param workers: worker threads; :param client_seconds: CPU seconds a client may spend per minute."""
        self.workers = workers
        self.budgets = ClientBudgets(client_seconds)
        self.per_client = max(1, workers - 1)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qemu-mcp-cpu")
        self._running: dict[str, int] = {}
        self._slot_freed: dict[str, asyncio.Event] = {}
        #: CPU seconds spent by finished jobs (for /metrics).
        self.cpu_seconds = 0.0
        self._spent_lock = threading.Lock()

    async def run(
        self, fn: Callable[[Job], T], *, seconds: float, client: str | None = None, what: str = "this work"
    ) -> tuple[T, float]:
        """``fn(job)`` in a worker thread, and the CPU seconds it used.

        ``job.remaining()`` starts at ``seconds`` (less the client's budget when that is lower) and counts the
        time spent waiting for a worker too; ``fn`` must stop when it reaches 0 (it may return a partial
        answer).  A call cancelled meanwhile sets ``job.cancelled`` and returns at once; the worker stops at
        its next check.

        :raise LimitExceeded: ``client`` has spent its CPU budget (the message says when to retry).
        :raise TimeoutError: no worker became free within ``seconds``.
        """
        allowance = seconds
        if client is not None:
            level = self.budgets.level(client)
            if level < self.MIN_START_S:
                wait = math.ceil(self.budgets.refill_seconds(client, self.MIN_START_S * 20))
                raise LimitExceeded(
                    f"client {client} has used its CPU budget for {what} ({self.budgets.capacity:g} s per minute); "
                    f"retry in about {wait} s, or use a simpler pattern"
                )
            allowance = min(seconds, level)
        job = Job(deadline=time.monotonic() + allowance)
        key = client or ""
        if client is not None:
            await self._take_slot(key, job)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._work, fn, job, client)
        if client is not None:
            future.add_done_callback(lambda _: self._free_slot(key))
        try:
            # The work watches its own deadline; the grace covers a step that ends just after it.
            return await asyncio.wait_for(asyncio.shield(future), job.remaining() + 1.0)
        except BaseException:
            job.cancelled.set()
            future.cancel()  # still queued: it never runs (a running one stops at its next check)
            raise

    def _work(self, fn: Callable[[Job], T], job: Job, client: str | None) -> tuple[T, float]:
        began = time.thread_time()
        try:
            return fn(job), time.thread_time() - began
        finally:
            spent = time.thread_time() - began
            with self._spent_lock:
                self.cpu_seconds += spent
            if client is not None:
                self.budgets.charge(client, spent)

    async def _take_slot(self, key: str, job: Job) -> None:
        """One of the client's ``per_client`` workers, waited for within the job's time."""
        while self._running.get(key, 0) >= self.per_client:
            freed = self._slot_freed.setdefault(key, asyncio.Event())
            freed.clear()
            async with asyncio.timeout(job.remaining()):
                await freed.wait()
        self._running[key] = self._running.get(key, 0) + 1

    def _free_slot(self, key: str) -> None:
        left = self._running.get(key, 1) - 1
        if left > 0:
            self._running[key] = left
        else:
            self._running.pop(key, None)
        freed = self._slot_freed.pop(key, None) if left <= 0 else self._slot_freed.get(key)
        if freed is not None:
            freed.set()

    def close(self) -> None:
        """Stop taking work; queued work is dropped, running work ends at its own deadline."""
        self._executor.shutdown(wait=False, cancel_futures=True)
