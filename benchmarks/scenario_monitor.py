"""Scenario ``monitor``: schedule drift and server CPU of one monitor_vm_status stream, then many streams at once."""

from __future__ import annotations

import asyncio
import time

from .harness import Bench, cpu_seconds, rss_mib


async def bench_monitor(b: Bench) -> None:
    if not b.running:  # the VMs to watch, made by a server of their own
        async with b.serving(), b.client() as client:
            await b.grow_to(client, 10)
    samples = 15 if b.quick else 60
    print(f"== monitor: {samples} samples at interval 1; concurrent streams", flush=True)
    async with b.serving(), b.client() as client:
        vm = b.running[0]
        arrivals: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            arrivals.append(time.monotonic())

        cpu0 = cpu_seconds(b.pid)
        result = await client.call_tool(
            "monitor_vm_status",
            {"name": vm, "interval": 1, "count": samples},
            progress_callback=on_progress,
            read_timeout_seconds=samples + 30,
        )
        cpu1 = cpu_seconds(b.pid)
        envelope = result.structured_content
        assert envelope and envelope["success"], envelope
        drift = (arrivals[-1] - arrivals[0]) - (samples - 1)
        per_sample_ms = (cpu1 - cpu0) / samples * 1000
        lateness = envelope["data"]["max_lateness_s"]
        b.report.add(
            f"monitor drift after {samples} samples (interval 1 s)",
            f"{drift * 1000:+.1f} ms at the client",
            f"server max lateness {lateness * 1000:.1f} ms; target < 50 ms",
        )
        b.report.add("server CPU per sample (all metrics)", f"{per_sample_ms:.2f} ms", "")

        streams = min(50, len(b.running))
        count = 5 if b.quick else 10
        rss0, cpu0 = rss_mib(b.pid), cpu_seconds(b.pid)
        peak = rss0
        began = time.monotonic()

        async def stream(name: str) -> int:
            got = 0

            async def on_p(progress: float, total: float | None, message: str | None) -> None:
                nonlocal got, peak
                got += 1
                peak = max(peak, rss_mib(b.pid))

            res = await client.call_tool(
                "monitor_vm_status",
                {"name": name, "interval": 1, "count": count},
                progress_callback=on_p,
                read_timeout_seconds=count + 60,
            )
            assert res.structured_content and res.structured_content["success"], res.structured_content
            return got

        got = await asyncio.gather(*(stream(name) for name in b.running[:streams]))
        wall = time.monotonic() - began
        cpu_pct = (cpu_seconds(b.pid) - cpu0) / wall * 100
        b.report.add(
            f"{streams} concurrent monitor streams x {count} samples",
            f"server CPU {cpu_pct:.0f}% of a core",
            f"RSS {rss0} -> peak {peak} MiB; {sum(got)} notifications",
        )
        b.report.data["monitor"] = {
            "samples": samples,
            "drift_ms": round(drift * 1000, 1),
            "server_max_lateness_ms": round(lateness * 1000, 1),
            "cpu_ms_per_sample": round(per_sample_ms, 2),
            "streams": streams,
            "stream_count": count,
            "streams_cpu_pct": round(cpu_pct, 1),
            "streams_rss_mib": [rss0, peak],
            "notifications": sum(got),
        }
