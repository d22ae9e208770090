"""The benchmarks' harness: timing and statistics, the report (table and JSON), the server and its VMs, the CLI.

The scenarios live in ``benchmarks/scenario_*.py``; ``benchmarks/run.py`` runs them (see its docstring).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp import Client

from tests.support import ServerProcess, kill_vms_under, open_tools

CLK_TCK = os.sysconf("SC_CLK_TCK")
SECTIONS = "list,concurrency,start,monitor,remote,resources,guest,console,snapshot,fleet,hostile"


# -- figures -------------------------------------------------------------------------------------


def summarize(samples_s: list[float]) -> dict[str, float]:
    """Median, p95 and spread (IQR) in milliseconds."""
    ms = sorted(s * 1000 for s in samples_s)
    q = statistics.quantiles(ms, n=20, method="inclusive") if len(ms) > 1 else [ms[0]] * 19
    quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(q[18], 2),
        "iqr_ms": round(quartiles[2] - quartiles[0], 2),
        "min_ms": round(ms[0], 2),
    }


async def timed(n: int, call: Callable[[], Awaitable[Any]], warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        await call()
    out = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        out.append(time.perf_counter() - began)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, what: str, figure: str, baseline: str = "") -> None:
        self.rows.append((what, figure, baseline))
        print(f"  {what:<52} {figure:<28} {baseline}", flush=True)

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows) if self.rows else 10
        lines = [f"{'measure':<{width}}  {'qemu-mcp-http':<28}  baseline", "-" * (width + 50)]
        lines += [f"{a:<{width}}  {b:<28}  {c}" for a, b, c in self.rows]
        return "\n".join(lines)


def fmt(s: dict[str, float]) -> str:
    return f"{s['median_ms']:.1f} ms (p95 {s['p95_ms']:.1f})"


# -- the server and its VMs ---------------------------------------------------------------------


class Bench:
    """What the scenarios share: the report, one server at a time on one vm_dir, and the VMs defined there.

    The VMs outlive each server on purpose (a scenario measures the next one against them, or a floor
    without a server); :func:`main` kills every QEMU under ``root`` by PID at the end.
    """

    def __init__(self, root: Path, report: Report, quick: bool) -> None:
        self.root = root
        self.report = report
        self.quick = quick
        self.vm_dir = root / "vms"
        self.vm_dir.mkdir()
        self.server: ServerProcess | None = None
        self.defined: list[str] = []
        self.running: list[str] = []

    def start_server(self, env: dict[str, str] | None = None) -> ServerProcess:
        """``env``: more of the server's settings (e.g. ``QEMU_MCP_ALLOWED_ROOTS``), over the harness's."""
        srv = ServerProcess(
            vm_dir=self.vm_dir,
            env={
                "QEMU_MCP_ACCEL": "tcg",
                "QEMU_MCP_LOG_LEVEL": "WARNING",
                "QEMU_MCP_MAX_MONITOR_STREAMS_PER_CLIENT": "64",
                "QEMU_MCP_MAX_MONITOR_STREAMS": "64",
                **(env or {}),
            },
        )
        srv.start()
        self.server = srv
        return srv

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @contextlib.asynccontextmanager
    async def serving(self, env: dict[str, str] | None = None) -> AsyncIterator[ServerProcess]:
        """A server for the block (stopped at its end, the VMs kept)."""
        try:
            yield self.start_server(env)
        finally:
            self.stop_server()

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server.proc is not None
        return self.server.proc.pid

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        assert self.server is not None
        async with open_tools(self.server.url) as tools:
            yield tools.client

    async def grow_to(self, client: Client, n: int) -> None:
        """Define VMs up to ``n`` (tiny, no boot media) and keep 10% of them running."""
        sem = asyncio.Semaphore(4)

        async def one(name: str, start: bool) -> None:
            async with sem:
                await ok(client, "manage_vm", name=name, action="create", arch="x86_64", memory="64M", vcpus=1)
                if start:
                    await ok(client, "manage_vm", name=name, action="start")

        new = [f"bench-{i:03d}" for i in range(len(self.defined), n)]
        want_running = n // 10
        starts = {name for name in new[: max(0, want_running - len(self.running))]}
        await asyncio.gather(*(one(name, name in starts) for name in new))
        self.defined += new
        self.running += sorted(starts)


async def ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    envelope = result.structured_content
    if envelope is None or not envelope.get("success"):
        raise RuntimeError(f"{tool} {arguments} failed: {envelope}")
    return dict(envelope)


# -- the CLI -------------------------------------------------------------------------------------


async def main(
    run_sections: Callable[[Bench, set[str]], Awaitable[None]], argv: list[str] | None = None, description: str = ""
) -> int:
    """Parse the options, run the chosen sections, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and VMs (a smoke run)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"), help="where to write figures")
    parser.add_argument("--sections", default=SECTIONS, help="comma-separated sections")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    if not shutil.which("qemu-system-x86_64"):
        print("qemu-system-x86_64 is not installed (bash scripts/setup.sh)", file=sys.stderr)
        return 2
    report = Report()
    report.data["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
    }
    root = Path(tempfile.mkdtemp(prefix="qmh-bench-", dir="/tmp"))
    bench = Bench(root, report, args.quick)
    try:
        await run_sections(bench, sections)
    finally:
        bench.stop_server()
        kill_vms_under(root)
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(report.table())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.data, indent=2) + "\n")
    print(f"\nfigures written to {args.json}")
    return 0
