"""Benchmarks of qemu-mcp-http with real QEMU and the real MCP client over HTTP, each figure beside its baseline.

    .venv/bin/python -m benchmarks.run [--quick] [--json FILE]
        [--sections list,concurrency,start,monitor,remote,resources,guest,console,snapshot,fleet,hostile]

Prints a table and writes JSON. Not a test: nothing here passes or fails; the figures go to the README.
Everything it starts (a server process, QEMUs under a temporary vm_dir, an sshd) is killed by PID at the end.
Section ``fleet``: list_vms host='*' over 10 SSH hosts of 100 VMs each (10 sshd, their users deleted at the end),
and 100 concurrent list_vms against 1 replica vs 2 behind HAProxy (with Redis).
Section ``hostile``: issue 23's slow console pattern and a 32 MiB agent reply, and what others see meanwhile.
The harness (timing, statistics, report, CLI) is ``benchmarks/harness.py``; each section is a
``benchmarks/scenario_<section>.py``.
"""

from __future__ import annotations

import asyncio
import sys

from . import harness
from .harness import Bench
from .scenario_concurrency import bench_concurrency
from .scenario_console import bench_console
from .scenario_fleet import bench_fleet
from .scenario_guest import bench_guest
from .scenario_hostile import bench_hostile
from .scenario_list import bench_list
from .scenario_monitor import bench_monitor
from .scenario_remote import bench_remote
from .scenario_resources import bench_resources
from .scenario_snapshot import bench_snapshot
from .scenario_start import bench_start


async def run_sections(bench: Bench, sections: set[str]) -> None:
    """The sections in the order that lets them share VMs: list grows them to 100, concurrency uses 100, fleet's
    replicas too (its SSH hosts are its own), the full run's list goes on to 500, monitor watches the running ones."""
    sizes = [0, 10, 100] if bench.quick else [0, 10, 100, 500]
    if "list" in sections:
        await bench_list(bench, sizes[:3])
    if "concurrency" in sections:
        await bench_concurrency(bench)
    if "fleet" in sections:
        await bench_fleet(bench)
    if "list" in sections and len(sizes) > 3:
        await bench_list(bench, sizes[3:])
    if "monitor" in sections:
        await bench_monitor(bench)
    if "resources" in sections:
        await bench_resources(bench)
    if "start" in sections:
        await bench_start(bench)
    if "remote" in sections:
        await bench_remote(bench)
    if "guest" in sections:
        await bench_guest(bench)
    if "console" in sections:
        await bench_console(bench)
    if "snapshot" in sections:
        await bench_snapshot(bench)
    if "hostile" in sections:
        await bench_hostile(bench)


async def main(argv: list[str] | None = None) -> int:
    return await harness.main(run_sections, argv, description=__doc__ or "")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
