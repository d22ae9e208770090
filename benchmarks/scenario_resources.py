"""Scenario ``resources``: the VMs as MCP resources with 100 VMs defined (10 running).

* notification latency: a running VM's QEMU is killed from outside (SIGKILL); the time until a
  ``subscriptions/listen`` stream (2026-07-28) and a ``resources/subscribe`` session (2025-11-25) receive
  ``resources/updated`` for it (target < 500 ms);
* the watcher's cost: the server's CPU over an idle period with nobody subscribed (target: none) and with one
  subscriber (a scan of the vm_dir every ``--watch-interval``), and one scan's CPU;
* ``resources/list`` (one page of 100) and a ``vm://`` read, beside ``list_vms`` of the same VMs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import httpx2 as httpx
from mcp.client import Client
from mcp.server.subscriptions import ResourceUpdated
from mcp_types import ResourceUpdatedNotification

from tests.support import pid_of

from .harness import Bench, cpu_seconds, fmt, ok, summarize, timed

IDLE_S = 10.0


async def _scans(b: Bench) -> int:
    assert b.server is not None
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"http://127.0.0.1:{b.server.port}/healthz")).json()
    scans: int = health["resources"]["watcher_scans"]
    return scans


async def _cpu_over(b: Bench, seconds: float) -> tuple[float, int]:
    """Server CPU seconds and watcher scans over ``seconds`` of waiting."""
    scans, cpu = await _scans(b), cpu_seconds(b.pid)
    await asyncio.sleep(seconds)
    return cpu_seconds(b.pid) - cpu, await _scans(b) - scans


async def bench_resources(b: Bench) -> None:
    print("== resources: notification latency, watcher cost, list and read", flush=True)
    reps = 3 if b.quick else 8
    async with b.serving() as server, b.client() as client:
        await b.grow_to(client, 100)
        idle_cpu, idle_scans = await _cpu_over(b, IDLE_S)
        b.report.add(
            f"server CPU, 100 VMs, nobody subscribed ({IDLE_S:g} s)",
            f"{idle_cpu * 1000:.0f} ms CPU, {idle_scans} scans",
            "target: none",
        )
        page = summarize(await timed(reps * 3, lambda: client.list_resources()))
        read = summarize(await timed(reps * 3, lambda: client.read_resource("vm://localhost/bench-050")))
        listed = summarize(await timed(reps * 3, lambda: client.call_tool("list_vms", {})))
        b.report.add("resources/list, 100 VMs (one page)", fmt(page), f"list_vms {fmt(listed)}")
        b.report.add("resources/read vm://localhost/<vm> (stopped)", fmt(read))

        victims = [name for name in b.running][:reps]
        new_latency: list[float] = []
        old_latency: list[float] = []
        killed_at: dict[str, float] = {}
        heard_new: dict[str, float] = {}
        heard_old: dict[str, float] = {}

        async def on_message(message: Any) -> None:
            if isinstance(message, ResourceUpdatedNotification):
                heard_old.setdefault(str(message.params.uri), time.perf_counter())

        uris = [f"vm://localhost/{name}" for name in victims]
        async with (
            Client(server.url, mode="2026-07-28") as listener,
            Client(server.url, mode="legacy", message_handler=on_message) as session,
            listener.listen(resource_subscriptions=uris) as stream,
        ):
            for uri in uris:
                await session.subscribe_resource(uri)

            async def read_stream() -> None:
                async for event in stream:
                    if isinstance(event, ResourceUpdated):
                        heard_new.setdefault(event.uri, time.perf_counter())

            reader = asyncio.create_task(read_stream())
            try:
                busy_cpu, busy_scans = await _cpu_over(b, IDLE_S)
                for name, uri in zip(victims, uris, strict=True):
                    killed_at[uri] = time.perf_counter()
                    os.kill(pid_of(b.vm_dir, name), signal.SIGKILL)
                    deadline = time.monotonic() + 10
                    while (uri not in heard_new or uri not in heard_old) and time.monotonic() < deadline:
                        await asyncio.sleep(0.005)
                    new_latency.append(heard_new.get(uri, float("inf")) - killed_at[uri])
                    old_latency.append(heard_old.get(uri, float("inf")) - killed_at[uri])
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        for name in victims:  # running again, for the scenarios after this one
            await ok(client, "manage_vm", name=name, action="start")
    new, old = summarize(new_latency), summarize(old_latency)
    per_scan = busy_cpu / busy_scans * 1000 if busy_scans else 0.0
    b.report.add(
        f"server CPU, 100 VMs, one subscriber ({IDLE_S:g} s)",
        f"{busy_cpu * 1000:.0f} ms CPU, {busy_scans} scans",
        f"{per_scan:.1f} ms CPU per scan",
    )
    b.report.add("QEMU killed -> resources/updated (2026 listen)", fmt(new), "target < 500 ms")
    b.report.add("QEMU killed -> resources/updated (2025 subscribe)", fmt(old), "target < 500 ms")
    b.report.data["resources"] = {
        "idle": {"cpu_ms": round(idle_cpu * 1000, 1), "scans": idle_scans, "seconds": IDLE_S},
        "subscribed": {"cpu_ms": round(busy_cpu * 1000, 1), "scans": busy_scans, "seconds": IDLE_S},
        "cpu_ms_per_scan": round(per_scan, 2),
        "list_page": page,
        "read": read,
        "list_vms": listed,
        "latency_listen": new,
        "latency_subscribe": old,
    }
