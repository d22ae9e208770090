"""Scenario ``start``: manage_vm start until QMP says running, beside the same QEMU argv launched directly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from qemu.qmp import QMPClient

from tests.support import pid_of

from .harness import Bench, fmt, ok, summarize


async def wait_running_direct(sock: Path, deadline: float) -> None:
    while True:
        qmp = QMPClient("direct")
        try:
            await asyncio.wait_for(qmp.connect(str(sock)), 2)
            while (await qmp.execute("query-status"))["status"] != "running":  # type: ignore[index]
                await asyncio.sleep(0.005)
            return
        except (OSError, EOFError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)
        finally:
            await qmp.disconnect()


async def bench_start(b: Bench) -> None:
    print("== start: manage_vm start vs the same QEMU argv launched directly", flush=True)
    reps = 3 if b.quick else 7
    name = "bench-start"
    async with b.serving(), b.client() as client:
        await ok(client, "manage_vm", name=name, action="create", arch="x86_64", memory="128M", vcpus=1)
        tool: list[float] = []
        argv: list[str] = []
        for _ in range(reps):
            began = time.perf_counter()
            await ok(client, "manage_vm", name=name, action="start")
            tool.append(time.perf_counter() - began)
            argv = json.loads((b.vm_dir / name / "runtime.json").read_text())["argv"]
            await ok(client, "manage_vm", name=name, action="stop", stop_timeout=0)
    # The server is gone (QEMU serves one QMP client at a time): the same argv, launched directly.
    direct: list[float] = []
    sock = b.vm_dir / name / "qmp.sock"
    for _ in range(reps):
        began = time.perf_counter()
        subprocess.run(argv, check=True, start_new_session=True)
        await wait_running_direct(sock, time.monotonic() + 30)
        direct.append(time.perf_counter() - began)
        pid = pid_of(b.vm_dir, name)
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.01)
        for leftover in ("qmp.sock", "qemu.pid"):
            (b.vm_dir / name / leftover).unlink(missing_ok=True)
    t, d = summarize(tool), summarize(direct)
    b.report.add(
        "start until running (tiny VM, TCG)",
        fmt(t),
        f"direct argv {fmt(d)}; overhead {t['median_ms'] - d['median_ms']:.0f} ms",
    )
    b.report.data["start"] = {"tool": t, "direct": d, "overhead_ms": round(t["median_ms"] - d["median_ms"], 1)}
