"""Scenario ``snapshot`` (issue 15): vm_snapshot of a stopped VM's disk and of a running guest with its memory.

* a stopped VM whose qcow2 disk (2 GiB) holds 1 GiB of written data (``qemu-io`` while it is stopped):
  ``vm_snapshot`` create / revert / delete (median of 5), beside ``qemu-img snapshot -c / -a / -d`` by hand on
  the same image (overhead target < 50 ms);
* a running busybox guest (256 MiB, TCG; it writes 1 MiB blocks to its disk twice a second): create with its
  memory (QMP ``snapshot-save``), revert (``snapshot-load``), delete (``snapshot-delete``), median of 5 each, and
  a disk-only create (``blockdev-snapshot-internal-sync``) and its delete.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mcp import Client

from .harness import Bench, fmt, ok, summarize
from .scenario_console import allowed_env, boot_busybox, busybox_iso
from .scenario_guest import run, run_timed


async def snap(client: Client, name: str, action: str, **arguments: Any) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    done = await ok(client, "vm_snapshot", name=name, action=action, **arguments)
    return time.perf_counter() - began, done["data"]


def overhead(tool: dict[str, float], by_hand: dict[str, float]) -> str:
    return f"qemu-img by hand {fmt(by_hand)}; overhead {tool['median_ms'] - by_hand['median_ms']:.0f} ms (target < 50)"


async def bench_stopped(b: Bench, client: Client, reps: int, out: dict[str, Any]) -> None:
    name = "bench-snap-disk"
    made = await ok(
        client, "manage_vm", name=name, action="create", arch="x86_64", memory="64M", vcpus=1, disk="size=2G"
    )
    disk = Path(made["data"]["details"]["disk"]["path"])
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1G", str(disk))
    await run("sync")
    times: dict[str, list[float]] = {"create": [], "revert": [], "delete": []}
    for i in range(reps):
        for action in ("create", "revert", "delete"):
            seconds, data = await snap(client, name, action, snapshot=f"s{i}")
            times[action].append(seconds)
            if action == "create":
                assert data["memory"] is False, data
    hand: dict[str, list[float]] = {"create": [], "revert": [], "delete": []}
    for i in range(reps):
        for action, flag in (("create", "-c"), ("revert", "-a"), ("delete", "-d")):
            hand[action].append(await run_timed("qemu-img", "snapshot", "-q", flag, f"h{i}", str(disk)))
    await ok(client, "manage_vm", name=name, action="delete", stop_timeout=0)
    out["stopped"] = {"disk_data_gib": 1, "reps": reps}
    for action in ("create", "revert", "delete"):
        tool, by_hand = summarize(times[action]), summarize(hand[action])
        b.report.add(f"snapshot {action}, stopped VM (1 GiB of data)", fmt(tool), overhead(tool, by_hand))
        out["stopped"][action] = {
            "tool": tool,
            "qemu_img": by_hand,
            "overhead_ms": round(tool["median_ms"] - by_hand["median_ms"], 1),
        }


async def bench_running(b: Bench, client: Client, reps: int, out: dict[str, Any]) -> None:
    name = "bench-snap-live"
    boot = await boot_busybox(client, name, busybox_iso(b), memory="256M")
    times: dict[str, list[float]] = {"create": [], "revert": [], "delete": []}
    saved: list[int] = []
    for i in range(reps):
        for action in ("create", "revert", "delete"):
            extra = {"memory": True} if action == "create" else {}
            seconds, data = await snap(client, name, action, snapshot=f"live{i}", **extra)
            times[action].append(seconds)
            if action == "create":
                saved.append(int(data["saved"]["memory_bytes"]))
    disk_only: dict[str, list[float]] = {"create": [], "delete": []}
    for i in range(reps):
        seconds, data = await snap(client, name, "create", snapshot=f"disk{i}", memory=False)
        assert data["memory"] is False, data
        disk_only["create"].append(seconds)
    for i in range(reps):
        disk_only["delete"].append((await snap(client, name, "delete", snapshot=f"disk{i}"))[0])
    await ok(client, "manage_vm", name=name, action="delete", stop_timeout=1)
    mib = sorted(saved)[len(saved) // 2] / (1 << 20)
    s = {action: summarize(samples) for action, samples in times.items()}
    d = {action: summarize(samples) for action, samples in disk_only.items()}
    b.report.add("snapshot create with memory, running 256 MiB guest", fmt(s["create"]), f"{mib:.0f} MiB of state")
    b.report.add("snapshot revert (snapshot-load), running guest", fmt(s["revert"]), "")
    b.report.add("snapshot delete, running guest", fmt(s["delete"]), "")
    b.report.add("snapshot create disk-only, running guest", fmt(d["create"]), f"its delete {fmt(d['delete'])}")
    out["running"] = {
        "memory": "256M",
        "boot_to_prompt_s": round(boot, 2),
        "saved_state_mib": round(mib, 1),
        "with_memory": s,
        "disk_only": d,
        "reps": reps,
    }


async def bench_snapshot(b: Bench) -> None:
    print("== snapshot: a stopped VM's disk (1 GiB of data) vs qemu-img; a running guest with its memory", flush=True)
    reps = 2 if b.quick else 5
    out: dict[str, Any] = {}
    async with b.serving(allowed_env(b)), b.client() as client:
        await bench_stopped(b, client, reps, out)
        await bench_running(b, client, reps, out)
    b.report.data["snapshot"] = out
