"""The monitoring loop: a fixed schedule (sample n is due at start + n*interval), one QMP session throughout."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInput, QemuMcpError, VMStateError
from ..vm.spec import validate_name
from ..vm.vmdir import VMDir
from .sampler import METRICS, HostClock, Metric, Sampler, sleep_until

__all__ = ["MonitorRun", "monitor_vm", "parse_metrics"]

OnSample = Callable[[int, dict[str, Any]], Awaitable[None]]


def parse_metrics(metrics: str) -> tuple[Metric, ...]:
    if metrics == "all":
        return METRICS
    if metrics in METRICS:
        return (metrics,)
    raise InvalidInput("metrics", f"{metrics!r} is not one of all, cpu, memory, disk, network")


@dataclass
class MonitorRun:
    """What a monitoring call collected; kept even when it ends early."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    max_lateness_s: float = 0.0
    ended_by: str = "count"


async def _host_clock(vms: VMDir, timeout: float) -> HostClock:
    """The host's clock tick and CPU count, asked once per host for the server's life."""
    key = ("clock", vms.host.identity)
    clock = vms.shared.host_facts.get(key)
    if not isinstance(clock, HostClock):
        clock = vms.shared.host_facts[key] = await HostClock.of(vms.host, timeout)
    return clock


async def monitor_vm(
    vms: VMDir,
    name: str,
    metrics: str,
    interval: float,
    count: int,
    on_sample: OnSample,
    run: MonitorRun,
) -> MonitorRun:
    """Sample ``name`` ``count`` times (0: until cancelled or the server's maximum duration).

    :raise VMStateError: the VM is not running, or stopped while being sampled (``run`` holds what was taken).
    """
    name = validate_name(name)
    chosen = parse_metrics(metrics)
    longest = vms.settings.monitor_max_duration
    if not math.isfinite(interval) or not 1 <= interval <= longest:
        raise InvalidInput("interval", f"{interval!r} must be a number of seconds from 1 to {longest:g}")
    if count < 0:
        raise InvalidInput("count", f"{count} must be >= 0 (0 samples until the client cancels)")
    settings = vms.settings
    # Independent reads at once: over SSH each would otherwise add its round trips.
    definition, all_facts, clock = await asyncio.gather(
        vms.store.load(name), vms.store.process_facts([name]), _host_clock(vms, settings.command_timeout)
    )
    facts = all_facts[name]
    if not facts.alive or facts.pid is None:
        raise VMStateError(f"VM {name} is not running; only running VMs can be monitored (start it first)")
    paths = vms.store.paths(name)
    loop = asyncio.get_running_loop()
    async with vms.qmp(name) as qmp:
        sampler = Sampler(
            vms.host, definition, paths, facts.pid, qmp, clock, chosen, vms.shared.agents, agent_timeout=1.0
        )
        try:
            await sampler.prepare(interval)
        except QemuMcpError as exc:
            raise VMStateError(f"VM {name} stopped before monitoring began: {exc.message}") from exc
        try:
            start = loop.time()
            stop_at = start + settings.monitor_max_duration
            n = 0
            while count == 0 or n < count:
                due = start + n * interval
                if due > stop_at:
                    run.ended_by = "max_duration"
                    break
                await sleep_until(due)
                run.max_lateness_s = max(run.max_lateness_s, loop.time() - due)
                sample = await sampler.sample()
                n += 1
                run.samples.append(sample)
                await on_sample(n, sample)
        finally:
            await sampler.aclose()
    return run
