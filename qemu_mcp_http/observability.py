"""Logs and metrics: what an operator sees of the server while it runs.

- :func:`configure_logging`: human text (default) or one JSON object per line, for every logger.
- :func:`tool_call`: times one tool call, logs one line when it ends and counts it; while it runs, its
  request id, tool, host and VM ride in a context variable, so every log line of the call carries them.
- :class:`Metrics`: a per-app Prometheus registry; pool and stream figures are read at scrape time, and a small
  task (:meth:`Metrics.sample_loop_lag`) records how late the event loop runs, so that a stall shows.

Nothing here sees a tool's arguments beyond host, VM name and action: no password, token or key reaches a line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import LogFormat
from .version import __version__

__all__ = [
    "CONTENT_TYPE",
    "CallRecord",
    "JsonFormatter",
    "Metrics",
    "configure_logging",
    "tool_call",
]

log = logging.getLogger("qemu_mcp_http.calls")

#: Fields of the call in progress, added to every log record made while it runs.
_call_fields: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "qemu_mcp_call", default=MappingProxyType({})
)

#: The fields a JSON line may carry besides time, level, logger and message, in this order.
_EXTRA_FIELDS = ("request_id", "tool", "host", "vm", "action", "duration_ms", "outcome", "error")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# -- logs -----------------------------------------------------------------------------------------


class _CallContextFilter(logging.Filter):
    """Copies the current call's fields onto each record (on the handler, so every logger gets them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _call_fields.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the call's fields when there are some."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _EXTRA_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(line, separators=(",", ":"), default=str)


def configure_logging(level: str, fmt: LogFormat) -> None:
    """One handler on the root logger, to stderr, in the chosen format (replaces any earlier setup)."""
    handler = logging.StreamHandler()
    handler.addFilter(_CallContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if level != "DEBUG":
        # asyncssh logs every channel (with its command line) at INFO: noise for an operator.
        logging.getLogger("asyncssh").setLevel(logging.WARNING)


# -- tool calls -----------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """What is known of a tool call; the caller fills in the outcome from the tool's answer."""

    tool: str
    request_id: str
    host: str = "localhost"
    vm: str | None = None
    action: str | None = None
    outcome: Literal["success", "failure", "cancelled", "input_required"] = "success"
    error: str | None = None

    def fail(self, error: str) -> None:
        self.outcome, self.error = "failure", error

    def fields(self) -> dict[str, str]:
        out = {"request_id": self.request_id, "tool": self.tool, "host": self.host}
        if self.vm is not None:
            out["vm"] = self.vm
        if self.action is not None:
            out["action"] = self.action
        return out


@contextlib.contextmanager
def tool_call(metrics: Metrics, record: CallRecord) -> Iterator[CallRecord]:
    """Run a tool call under ``record``: on exit, one INFO line and the metrics, whatever happened.

    An exception marks the call failed (cancellation: cancelled) and passes through unchanged.
    """
    token = _call_fields.set(record.fields())
    began = time.perf_counter()
    try:
        yield record
    except asyncio.CancelledError:  # the client cancelled, or the server is going down: marked, re-raised
        record.outcome, record.error = "cancelled", "CancelledError"
        raise
    except Exception as exc:
        record.fail(type(exc).__name__)
        raise
    finally:
        seconds = time.perf_counter() - began
        metrics.observe_call(record.tool, record.outcome, seconds)
        _call_fields.set(record.fields())  # the answer may have named host / VM more exactly
        duration_ms = round(seconds * 1000, 1)
        log.info(
            "%s %s host=%s vm=%s action=%s in %.1f ms%s [request %s]",
            record.tool,
            record.outcome,
            record.host,
            record.vm or "-",
            record.action or "-",
            duration_ms,
            f" ({record.error})" if record.error else "",
            record.request_id,
            extra={"duration_ms": duration_ms, "outcome": record.outcome, "error": record.error},
        )
        _call_fields.reset(token)


# -- metrics --------------------------------------------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: vm_dirs with a ``qemu_mcp_vms`` series at most (each has a few states).
MAX_VM_DIR_SERIES = 64

#: How often the event loop's lag is sampled, seconds.
LAG_SAMPLE_INTERVAL_S = 0.25
#: Seconds a timer of the event loop fired late: healthy is below a few ms; a stall shows as its length.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Seconds: a list takes milliseconds, a start waits for QMP, a monitor stream may run for hours.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

_POOL_COUNTERS = {
    "connections_opened": "SSH connections opened",
    "connections_closed": "SSH connections closed",
    "connections_reused": "tool calls served by an SSH connection already open",
    "connect_failures": "SSH connection attempts that failed",
    "channels_opened": "SSH channels opened",
    "exec_requests": "commands run over SSH",
    "sftp_requests": "SFTP requests sent",
    "streamlocal_opens": "unix-socket channels opened to VMs over SSH",
    "round_trips": "sequential network waits paid over SSH",
    "retries": "SSH operations retried on a fresh connection",
}


@dataclass
class _Sources:
    """Figures the server keeps anyway, read at scrape time rather than copied on every change."""

    pool: Callable[[], Mapping[str, Any]]
    monitor_streams: Callable[[], int]
    cpu_seconds: Callable[[], float]
    #: ``{(host, vm_dir): {state: count}}`` as the last list_vms of that directory saw it.
    vms: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)


class _StateCollector(Collector):
    def __init__(self, sources: _Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
        pool = self.sources.pool()
        for key, help_text in _POOL_COUNTERS.items():
            counter = CounterMetricFamily(f"qemu_mcp_ssh_{key}", help_text)
            counter.add_metric([], float(pool.get(key, 0)))
            yield counter
        open_conns = GaugeMetricFamily(
            "qemu_mcp_ssh_open_connections", "SSH connections open now, per user@host:port", labels=["target"]
        )
        for target, n in sorted(pool.get("hosts", {}).items()):
            open_conns.add_metric([target], n)
        yield open_conns
        cpu = CounterMetricFamily(
            "qemu_mcp_cpu_work_seconds",
            "CPU seconds spent by the worker pool on client or guest input (console patterns)",
        )
        cpu.add_metric([], self.sources.cpu_seconds())
        yield cpu
        yield GaugeMetricFamily(
            "qemu_mcp_monitor_streams", "monitor_vm_status calls running now", value=self.sources.monitor_streams()
        )
        vms = GaugeMetricFamily(
            "qemu_mcp_vms",
            "VMs by host, vm_dir and state, as the last list_vms of that vm_dir saw them",
            labels=["host", "vm_dir", "state"],
        )
        for (host, vm_dir), states in sorted(self.sources.vms.items()):
            for state, n in sorted(states.items()):
                vms.add_metric([host, vm_dir, state], n)
        yield vms
        build = GaugeMetricFamily("qemu_mcp_build_info", "the server's version", labels=["version"])
        build.add_metric([__version__], 1)
        yield build


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process never collide)."""

    def __init__(
        self,
        pool: Callable[[], Mapping[str, Any]],
        monitor_streams: Callable[[], int],
        cpu_seconds: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """:param pool: the SSH pool's snapshot; :param monitor_streams: the number of running monitor streams;
        :param cpu_seconds: CPU seconds the worker pool has spent."""
        self.registry = CollectorRegistry()
        self._sources = _Sources(pool, monitor_streams, cpu_seconds)
        self.tool_calls = Counter(
            "qemu_mcp_tool_calls",
            "tool calls, by tool and outcome (success, failure, cancelled, input_required: a round that asked "
            "the client's user, 2026-07-28)",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.tool_duration = Histogram(
            "qemu_mcp_tool_call_duration_seconds",
            "time from a tool call's arrival to its answer",
            ["tool"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "qemu_mcp_event_loop_lag_seconds",
            f"how late the event loop woke from a {LAG_SAMPLE_INTERVAL_S:g} s sleep: an event loop blocked by CPU "
            "work shows here as the length of the stall",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(self._sources))

    def observe_call(self, tool: str, outcome: str, seconds: float) -> None:
        self.tool_calls.labels(tool=tool, outcome=outcome).inc()
        self.tool_duration.labels(tool=tool).observe(seconds)

    def record_vms(self, host: str, vm_dir: str, states: Iterable[str]) -> None:
        """What a list_vms saw in ``vm_dir``: replaces what was known of it (VMs gone are no longer counted).

        Clients choose vm_dirs, so the label set is bounded: a vm_dir without VMs is dropped, and beyond
        ``MAX_VM_DIR_SERIES`` vm_dirs the least recently listed one makes room.
        """
        counts = {"running": 0, "stopped": 0}
        for state in states:
            counts[state] = counts.get(state, 0) + 1
        known = self._sources.vms
        known.pop((host, vm_dir), None)  # re-inserted last: the dict's order is the order of use
        if sum(counts.values()) == 0:
            return
        known[(host, vm_dir)] = counts
        while len(known) > MAX_VM_DIR_SERIES:
            del known[next(iter(known))]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def sample_loop_lag(self, interval: float = LAG_SAMPLE_INTERVAL_S) -> None:
        """Until cancelled: sleep ``interval`` and record how much later than asked the loop woke up."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - asked - interval))
