"""Scenario ``concurrency``: 100 concurrent list_vms over one MCP session (100 VMs, 10 running), with the
server's RSS idle, at its peak and after."""

from __future__ import annotations

import asyncio
import time

from .harness import Bench, ok, rss_mib, summarize


async def bench_concurrency(b: Bench) -> None:
    # 100 VMs (10 running), made by a server of their own: the measured one starts afresh.
    async with b.serving(), b.client() as client:
        await b.grow_to(client, max(len(b.defined), 100))
    print("== 100 concurrent list_vms", flush=True)
    async with b.serving():
        idle = rss_mib(b.pid)
        async with b.client() as client:
            await ok(client, "list_vms")
            peak = 0.0
            lat: list[float] = []

            async def one() -> None:
                nonlocal peak
                began = time.perf_counter()
                await ok(client, "list_vms")
                lat.append(time.perf_counter() - began)
                peak = max(peak, rss_mib(b.pid))

            began = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(100)))
            wall = time.perf_counter() - began
        s = summarize(lat)
        after = rss_mib(b.pid)
        b.report.add(
            f"100 concurrent list_vms ({len(b.defined)} VMs)",
            f"{100 / wall:.0f} calls/s, p95 {s['p95_ms']:.0f} ms",
            f"RSS idle {idle} MiB, peak {peak} MiB, after {after} MiB",
        )
        b.report.data["concurrency"] = {
            "calls": 100,
            "wall_s": round(wall, 3),
            "calls_per_s": round(100 / wall, 1),
            "latency": s,
            "rss_idle_mib": idle,
            "rss_peak_mib": peak,
            "rss_after_mib": after,
            "vms_defined": len(b.defined),
        }
