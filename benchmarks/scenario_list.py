"""Scenario ``list``: list_vms over HTTP beside a plain-asyncio floor (the same work written directly) and the
transport floor (a no-op tool on the same SDK stack), at growing numbers of VMs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mcp import Client
from qemu.qmp import QMPClient

from tests.support import free_port, open_tools

from .harness import Bench, fmt, ok, summarize, timed


async def plain_asyncio_floor(vm_dir: Path, running: list[str], reps: int) -> list[float]:
    """The same work as list_vms, written directly: read every definition, pid file and /proc cmdline
    in a batch off the loop, and query-status on QMP connections kept open (as the server's pool does)."""
    clients: dict[str, QMPClient] = {}
    for name in running:
        qmp = QMPClient(name)
        await asyncio.wait_for(qmp.connect(str(vm_dir / name / "qmp.sock")), 5)
        clients[name] = qmp

    def read_all() -> dict[str, tuple[bytes, bytes | None]]:
        out: dict[str, tuple[bytes, bytes | None]] = {}
        for name in os.listdir(vm_dir):
            if name.startswith("."):
                continue
            d = vm_dir / name
            definition = (d / "vm.json").read_bytes()
            try:
                pid = int((d / "qemu.pid").read_text())
                cmdline: bytes | None = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                cmdline = None
            out[name] = (definition, cmdline)
        return out

    async def one_listing() -> None:
        files = await asyncio.to_thread(read_all)
        rows = [json.loads(raw) for raw, _ in files.values()]
        alive = [name for name, (_, cmdline) in files.items() if cmdline and b"qemu-system" in cmdline]
        await asyncio.gather(*(clients[name].execute("query-status") for name in alive if name in clients))
        assert len(rows) == len(files)

    try:
        return await timed(reps, one_listing)
    finally:
        for qmp in clients.values():
            await qmp.disconnect()


@contextlib.asynccontextmanager
async def noop_server() -> AsyncIterator[Client]:
    """A client of :mod:`benchmarks.noop_server` (the transport floor), killed at exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.noop_server", "--port", str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with open_tools(f"http://127.0.0.1:{port}/mcp") as tools:
                    yield tools.client
                return
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                await asyncio.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()


async def bench_list(b: Bench, sizes: list[int]) -> None:
    r = b.report
    reps = 10 if b.quick else 30
    print("== list_vms: latency over HTTP vs the plain-asyncio floor and the transport floor", flush=True)
    results: dict[str, Any] = b.report.data.setdefault("list_vms", {})
    async with noop_server() as noop:
        transport = summarize(await timed(reps, lambda: noop.call_tool("noop", {})))
    b.report.data["transport_floor"] = transport
    for n in sizes:
        # The server stops at the end of the block: that closes its QMP connections, and QEMU serves one QMP
        # client at a time.
        async with b.serving(), b.client() as client:
            began = time.perf_counter()
            await b.grow_to(client, n)
            setup_s = time.perf_counter() - began
            http = summarize(await timed(reps, lambda: ok(client, "list_vms")))
            got = (await ok(client, "list_vms", status="running"))["data"]["vm_count"]
            assert got == len(b.running), (got, len(b.running))
        floor = summarize(await plain_asyncio_floor(b.vm_dir, b.running, reps))
        ratio = http["median_ms"] / floor["median_ms"] if floor["median_ms"] else float("nan")
        results[str(n)] = {"running": len(b.running), "http": http, "floor": floor, "setup_s": round(setup_s, 1)}
        r.add(
            f"list_vms, {n} VMs ({len(b.running)} running)",
            fmt(http),
            f"floor {fmt(floor)}; x{ratio:.1f}; no-op tool {fmt(transport)}",
        )
