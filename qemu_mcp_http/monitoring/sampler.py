"""Sampling one running VM: QMP, /proc and the guest agent, read in as few round trips as they allow."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import OperationTimeout, QemuMcpError, QMPFailure, QMPUnavailable, VMStateError
from ..hosts.base import Host
from ..vm.paths import VMPaths
from ..vm.qga import AgentPool
from ..vm.qmp import QMPSession
from ..vm.spec import MIB, VMDefinition
from .parse import (
    ProcStat,
    block_sizes,
    blockstats_by_device,
    guest_nic_stats,
    parse_proc_stat,
    parse_status_rss_kib,
    parse_uptime,
)

__all__ = ["METRICS", "HostClock", "Sampler"]

log = logging.getLogger(__name__)

Metric = Literal["cpu", "memory", "disk", "network"]
METRICS: tuple[Metric, ...] = ("cpu", "memory", "disk", "network")
BALLOON_PATH = "/machine/peripheral/balloon0"
#: Retry a silent guest agent only every this many samples, in the background, so that a guest
#: without one never delays a sample.
AGENT_RETRY_EVERY = 10
#: How long the first sample waits for the guest agent's first answer (it takes 5-100 ms when there is one).
AGENT_PROBE_BUDGET = 0.3


@dataclass(frozen=True)
class HostClock:
    """Facts of the host needed to turn tick counters into percentages."""

    clk_tck: int
    cpus: int

    @classmethod
    async def of(cls, host: Host, timeout: float) -> HostClock:
        tck, cpus = await asyncio.gather(
            host.run(["getconf", "CLK_TCK"], timeout=timeout), host.run(["nproc"], timeout=timeout)
        )
        return cls(clk_tck=int(tck.stdout.strip()), cpus=int(cpus.stdout.strip()))


def _rate(now: int, before: int, seconds: float) -> float:
    return round((now - before) / seconds, 2) if seconds > 0 else 0.0


class Sampler:
    """Takes samples of one VM; keeps the previous counters to turn them into rates."""

    def __init__(
        self,
        host: Host,
        definition: VMDefinition,
        paths: VMPaths,
        pid: int,
        qmp: QMPSession,
        clock: HostClock,
        metrics: Sequence[Metric],
        agents: AgentPool,
        agent_timeout: float,
    ) -> None:
        self.host = host
        self.agents = agents
        self.definition = definition
        self.paths = paths
        self.pid = pid
        self.qmp = qmp
        self.clock = clock
        self.metrics = tuple(metrics)
        self.agent_timeout = agent_timeout
        self._prev: dict[str, Any] | None = None
        self._samples = 0
        self._agent_silent_since: int | None = None
        self._agent_probe: asyncio.Task[bool] | None = None
        self._vcpu_threads: list[tuple[int, int]] | None = None

    async def prepare(self, interval: float) -> None:
        """Set up what the samples need, all at once.

        The guest agent is probed too, but waited for only ``AGENT_PROBE_BUDGET``: an agent that
        answers is used from the first sample on; a silent one (most guests have none) costs the
        schedule nothing, and a late answer is picked up by a later sample.
        """
        steps: dict[str, Awaitable[Any]] = {}
        if "memory" in self.metrics:
            steps["balloon"] = self._enable_balloon_stats(interval)
        if "cpu" in self.metrics:
            steps["cpus"] = self.qmp.execute("query-cpus-fast")
        if "network" in self.metrics:
            self._agent_probe = asyncio.create_task(self._agent_answers())
            self._agent_silent_since = 0  # until the probe says otherwise
            steps["agent"] = asyncio.wait([self._agent_probe], timeout=AGENT_PROBE_BUDGET)
        done = await _all(steps)
        if "cpus" in done:
            self._vcpu_threads = [(int(c["cpu-index"]), int(c["thread-id"])) for c in done["cpus"]]

    async def _enable_balloon_stats(self, interval: float) -> None:
        try:
            await self.qmp.execute(
                "qom-set",
                {"path": BALLOON_PATH, "property": "guest-stats-polling-interval", "value": max(1, int(interval))},
            )
        except QMPFailure as exc:
            log.info("guest memory statistics unavailable for %s: %s", self.definition.name, exc)

    async def sample(self) -> dict[str, Any]:
        """One sample of the chosen metrics.

        :raise VMStateError: QEMU is gone (the VM stopped or was killed).
        """
        pid = self.pid
        files = [f"/proc/{pid}/stat", f"/proc/{pid}/status", "/proc/uptime"]
        threads = self._vcpu_threads or []
        files += [f"/proc/{pid}/task/{tid}/stat" for _, tid in threads]
        fetches: dict[str, Awaitable[Any]] = {"files": self.host.read_files(files, timeout=self.qmp.timeout)}
        if "memory" in self.metrics:
            fetches["memory"] = self._memory_fetch()
        if "disk" in self.metrics:
            fetches["disk"] = self._disk_fetch()
        if "network" in self.metrics:
            fetches["network"] = self._network_fetch()
        try:
            # Everything at once: over SSH the /proc reads, the QMP commands (pipelined on one
            # connection) and the guest agent share their round trips instead of adding them up.
            got = await _all(fetches)
            raw = got["files"]
            counters: dict[str, Any] = {}
            if raw[files[0]] is None:
                raise QMPUnavailable("process gone")
            uptime = parse_uptime(raw["/proc/uptime"] or b"0")
            proc = parse_proc_stat(raw[files[0]] or b"")
            counters["t"] = uptime
            counters["proc"] = proc
            counters["threads"] = {
                idx: parse_proc_stat(raw[f"/proc/{pid}/task/{tid}/stat"] or b"")
                for idx, tid in threads
                if raw.get(f"/proc/{pid}/task/{tid}/stat")
            }
            out: dict[str, Any] = {"timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")}
            started = proc.starttime / self.clock.clk_tck
            prev = self._prev
            seconds = uptime - (prev["t"] if prev else started)
            out["rates_over"] = "interval" if prev else "since_vm_start"
            out["rate_seconds"] = round(seconds, 3)
            if "cpu" in self.metrics:
                out["cpu"] = self._cpu(counters, prev, seconds)
            if "memory" in self.metrics:
                out["memory"] = self._memory(raw[files[1]], got["memory"])
            if "disk" in self.metrics:
                out["disk"], counters["disk"] = self._disk(got["disk"], prev, seconds)
            if "network" in self.metrics:
                out["network"], counters["net"] = self._network(got["network"], prev, seconds)
        except (QMPUnavailable, OperationTimeout) as exc:
            if isinstance(exc, OperationTimeout):
                raise
            raise VMStateError(f"VM {self.definition.name} is no longer running (QEMU pid {pid} is gone)") from exc
        self._prev = counters
        self._samples += 1
        return out

    def _cpu(self, counters: dict[str, Any], prev: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
        tck = self.clock.clk_tck
        proc: ProcStat = counters["proc"]
        before = prev["proc"].cpu_ticks if prev else 0
        busy = (proc.cpu_ticks - before) / tck
        per_core = 100.0 * busy / seconds if seconds > 0 else 0.0
        vcpus = []
        for idx, stat in sorted(counters["threads"].items()):
            was = prev["threads"].get(idx) if prev else None
            used = (stat.cpu_ticks - (was.cpu_ticks if was else 0)) / tck
            vcpus.append(
                {
                    "index": idx,
                    "cpu_seconds": round(stat.cpu_ticks / tck, 2),
                    "cpu_percent": round(100.0 * used / seconds, 2) if seconds > 0 else 0.0,
                }
            )
        return {
            "vcpu_count": self.definition.vcpus,
            "host_cpu_percent": round(per_core / self.clock.cpus, 2),
            "process_cpu_percent": round(per_core, 2),
            "process_cpu_seconds": round(proc.cpu_ticks / tck, 2),
            "host_cpus": self.clock.cpus,
            "vcpus": vcpus,
        }

    async def _memory_fetch(self) -> tuple[Any, Any]:
        """``query-balloon`` (or why not) and the balloon's guest statistics, both at once."""

        async def failure_as_value(command: str, arguments: dict[str, Any] | None = None) -> Any:
            try:
                return await self.qmp.execute(command, arguments)
            except QMPUnavailable:
                raise
            except QMPFailure as exc:
                return exc

        balloon, stats = await asyncio.gather(
            failure_as_value("query-balloon"),
            failure_as_value("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"}),
        )
        return balloon, stats

    def _memory(self, status: bytes | None, fetched: tuple[Any, Any]) -> dict[str, Any]:
        rss = parse_status_rss_kib(status or b"")
        out: dict[str, Any] = {
            "configured_bytes": self.definition.memory_mib * MIB,
            "qemu_rss_bytes": rss * 1024 if rss is not None else None,
        }
        balloon, stats = fetched
        if isinstance(balloon, QMPFailure):
            out["balloon_actual_bytes"] = None
            out["balloon_reason"] = str(balloon)
        else:
            out["balloon_actual_bytes"] = int(balloon["actual"])
        if isinstance(stats, QMPFailure):
            stats = {}
        values = (stats or {}).get("stats", {})
        total, free = values.get("stat-total-memory", -1), values.get("stat-free-memory", -1)
        if (stats or {}).get("last-update", 0) and total >= 0 and free >= 0:
            out["guest_total_bytes"], out["guest_free_bytes"] = int(total), int(free)
            available = values.get("stat-available-memory", -1)
            out["guest_available_bytes"] = int(available) if available >= 0 else None
        else:
            out["guest_total_bytes"] = out["guest_free_bytes"] = None
            out["guest_reason"] = "the guest's balloon driver has not reported statistics"
        return out

    async def _disk_fetch(self) -> tuple[Any, Any]:
        stats, block = await asyncio.gather(self.qmp.execute("query-blockstats"), self.qmp.execute("query-block"))
        return stats, block

    def _disk(
        self, fetched: tuple[Any, Any], prev: dict[str, Any] | None, seconds: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        stats = blockstats_by_device(fetched[0])
        sizes = block_sizes(fetched[1])
        devices: dict[str, Any] = {}
        for name, now in stats.items():
            # Not a disk: an empty CD-ROM drive, an internal node, or arm64's UEFI code/variables flash.
            if name not in sizes or name.startswith("pflash"):
                continue
            was = prev["disk"].get(name) if prev else None
            base = was or dict.fromkeys(now, 0)
            devices[name] = {
                **now,
                "read_bytes_per_s": _rate(now["read_bytes"], base["read_bytes"], seconds),
                "write_bytes_per_s": _rate(now["write_bytes"], base["write_bytes"], seconds),
                "read_ops_per_s": _rate(now["read_ops"], base["read_ops"], seconds),
                "write_ops_per_s": _rate(now["write_ops"], base["write_ops"], seconds),
                **sizes[name],
            }
        return {"devices": devices}, stats

    async def aclose(self) -> None:
        """Stop a background agent probe."""
        if self._agent_probe is not None:
            self._agent_probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._agent_probe

    async def _agent_answers(self) -> bool:
        try:
            async with self.agents.session(self.host, self.paths.qga_socket, self.agent_timeout) as agent:
                await agent.execute("guest-ping")
        except QemuMcpError:
            return False
        return True

    async def _network_fetch(self) -> tuple[str | None, Any]:
        """The guest agent's interfaces, or ``(None, reason)`` when it does not answer (never waits on a
        silent agent: that is probed in the background)."""
        reason = "user-mode networking has no host-side counters and the guest agent (qemu-guest-agent) did not answer"
        silent = self._agent_silent_since
        if silent is not None:
            probe = self._agent_probe
            if probe is not None and probe.done():
                self._agent_probe = None
                if not probe.cancelled() and probe.exception() is None and probe.result():
                    self._agent_silent_since = silent = None  # it answers now: ask it below
            elif probe is None and (self._samples - silent) % AGENT_RETRY_EVERY == 0:
                self._agent_probe = asyncio.create_task(self._agent_answers())
        if silent is not None:
            return None, reason
        try:
            async with self.agents.session(self.host, self.paths.qga_socket, self.agent_timeout) as agent:
                reply = await agent.execute("guest-network-get-interfaces")
        except QemuMcpError:
            self._agent_silent_since = self._samples
            return None, reason
        self._agent_silent_since = None
        return "guest-agent", reply

    def _network(
        self, fetched: tuple[str | None, Any], prev: dict[str, Any] | None, seconds: float
    ) -> tuple[dict[str, Any], Any]:
        source, reply = fetched
        if source is None:
            return {"nic0": None, "source": None, "reason": reply}, None
        now = guest_nic_stats(reply, self.definition.mac)
        if now is None:
            return {"nic0": None, "source": "guest-agent", "reason": "the guest agent reports no statistics"}, None
        was = prev.get("net") if prev else None
        if was is None and prev is not None:
            rates: dict[str, float | None] = dict.fromkeys(("rx_bytes_per_s", "tx_bytes_per_s"), None)
        else:
            base = was or dict.fromkeys(now, 0)
            rates = {
                "rx_bytes_per_s": _rate(now["rx_bytes"], base["rx_bytes"], seconds),
                "tx_bytes_per_s": _rate(now["tx_bytes"], base["tx_bytes"], seconds),
                "rx_packets_per_s": _rate(now["rx_packets"], base["rx_packets"], seconds),
                "tx_packets_per_s": _rate(now["tx_packets"], base["tx_packets"], seconds),
            }
        return {"nic0": {**now, **rates}, "source": "guest-agent"}, now


async def sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _all(fetches: dict[str, Awaitable[Any]]) -> dict[str, Any]:
    """Await every fetch at once; if one fails, cancel the others and raise its error."""
    tasks = {key: asyncio.ensure_future(aw) for key, aw in fetches.items()}
    try:
        await asyncio.gather(*tasks.values())
    except BaseException:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        raise
    return {key: task.result() for key, task in tasks.items()}
