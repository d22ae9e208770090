"""Scenario ``hostile`` (issue 23): what a hostile client or guest costs the server, and everyone else meanwhile.

* the issue's reproduction: ``vm_console wait`` (``timeout`` 5) with ``(.*)(.*)(.*)\\1\\2\\3\\d{12}`` over an
  ordinary 3000-line boot log: how long the call takes, and ``/healthz`` (asked every 100 ms meanwhile) and the
  server's event-loop lag (``/metrics``) during it;
* a guest agent that answers ``guest-info`` with ``{"return":[{},{},...]}`` of 32 MiB (``tests/fakeagent.py``,
  a process of its own): the time to refuse it and the client's memory peak (``tracemalloc``), beside parsing
  that line whole with ``json.loads`` (what the server did before).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import tracemalloc

import httpx2 as httpx

from qemu_mcp_http.errors import GuestAgentReplyRefused
from qemu_mcp_http.hosts.local import LocalHost
from qemu_mcp_http.vm.qga import guest_agent
from tests.test_agent_replies import fake_agent
from tests.test_cpu_bounds import SLOW, boot_log

from .harness import Bench, ok


async def bench_hostile(b: Bench) -> None:
    b.report.add("-- hostile input (issue 23)", "", "")
    async with b.serving() as srv, b.client() as client:
        await ok(client, "manage_vm", name="hostile", action="create", arch="x86_64", memory="64M", disk="size=16M")
        (b.vm_dir / "hostile" / "console.log").write_text(boot_log(3000))
        base = srv.url.removesuffix("/mcp")
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            before = _lag_count(await http.get("/metrics"))
            began = time.monotonic()
            wait = asyncio.create_task(
                client.call_tool(
                    "vm_console", {"name": "hostile", "action": "wait", "offset": 0, "timeout": 5, "pattern": SLOW}
                )
            )
            health = []
            while not wait.done():
                asked = time.monotonic()
                await http.get("/healthz")
                health.append(time.monotonic() - asked)
                await asyncio.sleep(0.1)
            await wait
            took = time.monotonic() - began
            after = _lag_count(await http.get("/metrics"))
        await ok(client, "manage_vm", name="hostile", action="delete")
    over = {le: after[le] - before.get(le, 0.0) for le in after}
    worst = next((le for le in ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "1.0") if over[le] == over["+Inf"]),
                 "> 1 s")  # fmt: skip
    b.report.add("slow-pattern wait, timeout 5 s (issue: 36.6 s)", f"{took:.1f} s", "before: 51 s on this machine")
    b.report.add(
        "/healthz during it",
        f"median {statistics.median(health) * 1000:.1f} ms, max {max(health) * 1000:.0f} ms",
        f"n={len(health)}; before: unanswered for 50 s",
    )
    b.report.add("event-loop lag during it (/metrics)", f"every sample <= {worst} s", f"{int(over['+Inf'])} samples")
    b.report.data["hostile_wait"] = {"seconds": round(took, 2), "healthz_ms": [round(h * 1000, 1) for h in health]}

    line = b'{"return":[' + b"{}," * ((32 << 20) // 3 - 10) + b"{}]}"
    tracemalloc.start()
    began = time.perf_counter()
    json.loads(line)
    whole_s = time.perf_counter() - began
    _, whole_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del line
    with fake_agent(b.root, "elements") as path:
        async with guest_agent(LocalHost(), path, timeout=30) as agent:
            tracemalloc.start()
            began = time.perf_counter()
            with contextlib.suppress(GuestAgentReplyRefused):
                await agent.execute("guest-info")
            refused_s = time.perf_counter() - began
            _, refused_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    b.report.add(
        "agent reply of 32 MiB of {} (refused)",
        f"{refused_s * 1000:.0f} ms, peak {refused_peak / 2**20:.1f} MiB",
        f"json.loads of it whole: {whole_s:.2f} s, peak {whole_peak / 2**20:.0f} MiB",
    )
    b.report.data["hostile_agent"] = {
        "refused_ms": round(refused_s * 1000, 1),
        "refused_peak_mib": round(refused_peak / 2**20, 2),
        "whole_parse_s": round(whole_s, 2),
        "whole_parse_peak_mib": round(whole_peak / 2**20),
    }


def _lag_count(response: httpx.Response) -> dict[str, float]:
    """The event-loop lag histogram's cumulative buckets, ``{le: count}``."""
    out = {}
    for line in response.text.splitlines():
        if line.startswith("qemu_mcp_event_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out
