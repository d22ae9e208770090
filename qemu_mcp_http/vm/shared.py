"""What every VM operation of one server shares: per-VM locks, QMP and guest-agent connections, the accelerator
probe's verdicts, host facts and the CPU pool for work on client or guest input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from ..cpu import CpuPool
from ..errors import OperationTimeout
from .accel import AccelProbe
from .qga import AgentPool
from .qmp import QMPPool

__all__ = ["SharedState"]


@dataclass
class SharedState:
    """What every VM operation of one server shares: per-VM locks, QMP and agent connections, accelerator verdicts."""

    accel_probe: AccelProbe = field(default_factory=AccelProbe)
    qmp: QMPPool = field(default_factory=QMPPool)
    agents: AgentPool = field(default_factory=AgentPool)
    #: Worker threads for CPU work on client or guest input (sized from the settings by AppContext).
    cpu: CpuPool = field(default_factory=lambda: CpuPool(workers=2, client_seconds=30.0))
    #: Facts of a host that do not change while the server runs (clock tick, CPU count), by host identity.
    host_facts: dict[tuple[str, str], object] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Close the shared QMP and guest-agent connections (the VMs keep running) and the CPU pool."""
        await self.qmp.aclose()
        await self.agents.aclose()
        self.cpu.close()

    _locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)

    _console_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    @asynccontextmanager
    async def console_lock(self, host: str, socket_path: str) -> AsyncIterator[None]:
        """One writer at a time on a VM's serial console socket (QEMU serves one client)."""
        lock = self._console_locks.setdefault((host, socket_path), asyncio.Lock())
        async with lock:
            yield

    @asynccontextmanager
    async def vm_lock(self, host: str, vm_dir: str, name: str, timeout: float) -> AsyncIterator[None]:
        """The in-process lock of one VM.

        :raise OperationTimeout: another call held it for longer than ``timeout``.
        """
        key = (host, vm_dir, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            try:
                async with asyncio.timeout(timeout):
                    await lock.acquire()
            except TimeoutError:
                raise OperationTimeout(
                    f"another operation on VM {name} held its lock for more than {timeout:g} s; retry later"
                ) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            if not lock.locked() and not lock._waiters:
                self._locks.pop(key, None)
