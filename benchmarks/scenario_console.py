"""Scenario ``console`` (issue 14): the serial console and the screen of a running busybox guest (256 MiB, TCG).

* screenshot: ``vm_console screenshot`` (median of 20), beside QMP ``screendump`` on the VM's socket directly
  (no server) and the PNG read back;
* wait's reaction: ``echo MARK-n`` sent with ``action=send``, 20 times, each twice:
  - as an agent does it (send, then wait from the offset before the send): from the send's start until the
    wait returns the match, beside the moment the line is in console.log (polled every 1 ms) and the send alone
    (it lingers ``LINGER_BASE_S`` so that QEMU hands the guest every byte);
  - with a wait already waiting (begun 1 s before the send, so at its idle poll rate): from the line being in
    console.log until that wait returns (target: its poll interval, <= 250 ms);
* typing: ``action=type`` of a 200-character line into the screen shell (``screen# ``): keys per second, beside
  the floor of QEMU's key pacing (each key press and release held 10 ms); the line echoes to /dev/console
  (the serial log), which proves no key was lost;
* ``action=read`` of the last 50 lines (median of 20), beside reading console.log's tail in this process.

:func:`busybox_iso` and :func:`boot_busybox` serve the ``snapshot`` scenario too.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from mcp import Client
from qemu.qmp import QMPClient

from qemu_mcp_http.console.keys import combo_duration_ms, text_to_key_combos
from tests.buildcache import link_or_copy
from tests.guest_image import READY_MARKER, build_guest_isos

from .harness import Bench, fmt, ok, summarize, timed

BOOT_TIMEOUT = 240.0
TYPED_CHARS = 200
WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "0123456789"]


def busybox_iso(b: Bench) -> Path:
    """The busybox guest ISO (built once, cached), placed under the bench's root (the server's allowed root)."""
    return link_or_copy(build_guest_isos().amd64, b.root / "images" / "guest-amd64.iso")


def allowed_env(b: Bench) -> dict[str, str]:
    """The server's settings for VMs made from files under the bench's root (images, ISOs)."""
    return {"QEMU_MCP_ALLOWED_ROOTS": str(b.root)}


async def console_end(client: Client, name: str) -> int:
    read = await ok(client, "vm_console", name=name, action="read", lines=1)
    end: int = read["data"]["next_offset"]
    return end


async def boot_busybox(client: Client, name: str, iso: Path, memory: str = "256M") -> float:
    """Create and start the busybox guest; seconds until its serial shell's prompt."""
    await ok(
        client, "manage_vm", name=name, action="create", arch="x86_64", memory=memory, vcpus=1, disk="size=128M",
        iso=str(iso),
    )  # fmt: skip
    began = time.perf_counter()
    await ok(client, "manage_vm", name=name, action="start")
    ready = await ok(
        client, "vm_console", name=name, action="wait", pattern=READY_MARKER, offset=0, timeout=BOOT_TIMEOUT
    )
    await ok(client, "vm_console", name=name, action="wait", pattern="guest# $", offset=ready["data"]["offset"])
    return time.perf_counter() - began


async def appeared(log: Path, offset: int, pattern: re.Pattern[bytes], timeout: float = 60.0) -> float:
    """The moment ``pattern`` is in ``log`` past ``offset`` (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            if pattern.search(f.read()):
                return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pattern.pattern!r} not in {log} after {timeout:g} s")
        await asyncio.sleep(0.001)


async def finished(call: Awaitable[Any]) -> float:
    await call
    return time.perf_counter()


def typed_line(k: int) -> tuple[str, str]:
    """A line of exactly :data:`TYPED_CHARS` characters (words, capitals, digits) that echoes to the serial
    console, and what it prints there."""
    head, tail = "echo ", f" TYPED-{k} >/dev/console\n"
    want = TYPED_CHARS - len(head) - len(tail)
    filler = ""
    for word in itertools.cycle(WORDS):
        if len(filler) >= want:
            break
        filler += (" " if filler else "") + word
    filler = filler[:want].rstrip(" ").ljust(want, "x")
    return head + filler + tail, f"{filler} TYPED-{k}"


async def bench_console(b: Bench) -> None:
    print("== console: screenshot, wait's reaction, typing rate, read (busybox guest, TCG)", flush=True)
    n = 5 if b.quick else 20
    type_reps = 2 if b.quick else 5
    name = "bench-console"
    iso = busybox_iso(b)
    log = b.vm_dir / name / "console.log"
    out: dict[str, Any] = {}
    async with b.serving(allowed_env(b)), b.client() as client:
        boot = await boot_busybox(client, name, iso)
        out["boot_to_prompt_s"] = round(boot, 2)

        shots = summarize(await timed(n, lambda: ok(client, "vm_console", name=name, action="screenshot")))
        facts = (await ok(client, "vm_console", name=name, action="screenshot"))["data"]

        # wait, as an agent uses it: send, then wait from the offset before the send.
        seq: list[float] = []
        echo: list[float] = []
        send_only: list[float] = []
        for i in range(n):
            mark = 1000 + i
            end = await console_end(client, name)
            poll = asyncio.create_task(appeared(log, end, re.compile(rb"(?m)^MARK-%d\r?$" % mark)))
            began = time.perf_counter()
            await ok(client, "vm_console", name=name, action="send", text=f"echo MARK-{mark}\n")
            sent = time.perf_counter()
            await ok(client, "vm_console", name=name, action="wait", pattern=rf"^MARK-{mark}\s*$", offset=end)
            seq.append(time.perf_counter() - began)
            echo.append(await poll - began)
            send_only.append(sent - began)

        # wait, already waiting when the line comes.
        reaction: list[float] = []
        for i in range(n):
            mark = 2000 + i
            end = await console_end(client, name)
            waiter = asyncio.create_task(
                finished(ok(client, "vm_console", name=name, action="wait", pattern=rf"^MARK-{mark}\s*$", offset=end))
            )
            await asyncio.sleep(1.0)  # the wait is at its idle poll interval by now
            poll = asyncio.create_task(appeared(log, end, re.compile(rb"(?m)^MARK-%d\r?$" % mark)))
            await ok(client, "vm_console", name=name, action="send", text=f"echo MARK-{mark}\n")
            reaction.append(await waiter - await poll)

        # typing into the screen shell; a first short line until the screen shell answers
        for attempt in range(10):
            end = await console_end(client, name)
            await ok(client, "vm_console", name=name, action="type", text=f"echo SCREEN-{attempt} >/dev/console\n")
            seen = await client.call_tool(
                "vm_console",
                {"name": name, "action": "wait", "pattern": rf"^SCREEN-{attempt}\s*$", "offset": end, "timeout": 10},
            )
            if seen.structured_content and seen.structured_content.get("success"):
                break
        else:
            raise RuntimeError("the screen shell never echoed a typed line to the serial console")
        typing: list[float] = []
        floors: list[float] = []
        intact = 0
        for k in range(type_reps):
            text, printed = typed_line(k)
            assert len(text) == TYPED_CHARS, len(text)
            floors.append(sum(combo_duration_ms(c) for c in text_to_key_combos(text)) / 1000)
            end = await console_end(client, name)
            began = time.perf_counter()
            await ok(client, "vm_console", name=name, action="type", text=text)
            typing.append(time.perf_counter() - began)
            echoed = await client.call_tool(
                "vm_console",
                {"name": name, "action": "wait", "pattern": "^" + re.escape(printed) + r"\s*$", "offset": end,
                 "timeout": 30},
            )  # fmt: skip
            intact += bool(echoed.structured_content and echoed.structured_content.get("success"))

        reads = summarize(await timed(n, lambda: ok(client, "vm_console", name=name, action="read", lines=50)))

    async def tail_by_hand() -> None:
        lines = log.read_bytes().decode(errors="replace").splitlines()[-50:]
        assert lines

    tail = summarize(await timed(n, tail_by_hand))

    # The server is gone (it held the VM's QMP connection): screendump on the socket directly.
    qmp = QMPClient("bench-direct")
    await qmp.connect(str(b.vm_dir / name / "qmp.sock"))
    png = b.root / "direct-screendump.png"

    async def screendump() -> None:
        await qmp.execute("screendump", {"filename": str(png), "format": "png"})
        assert png.read_bytes()[:4] == b"\x89PNG"
        png.unlink()

    try:
        direct = summarize(await timed(n, screendump))
    finally:
        await qmp.disconnect()
    async with b.serving(allowed_env(b)), b.client() as client:
        await ok(client, "manage_vm", name=name, action="delete", stop_timeout=1)

    s_seq, s_echo, s_send, s_react = summarize(seq), summarize(echo), summarize(send_only), summarize(reaction)
    s_type = summarize(typing)
    kps = TYPED_CHARS / (s_type["median_ms"] / 1000)
    floor_kps = TYPED_CHARS / (sorted(floors)[len(floors) // 2])
    b.report.add(
        f"vm_console screenshot ({facts['width']}x{facts['height']} PNG)",
        fmt(shots),
        f"QMP screendump directly {fmt(direct)}",
    )
    b.report.add("send 'echo MARK-n', then wait: until the match", fmt(s_seq), f"in console.log {fmt(s_echo)}")
    b.report.add("  of which the send call (lingers for the UART)", fmt(s_send), "")
    b.report.add("a waiting wait: line in console.log -> match", fmt(s_react), "its idle poll interval: 250 ms")
    b.report.add(
        f"type {TYPED_CHARS} characters (screen shell)",
        f"{kps:.1f} keys/s ({s_type['median_ms'] / 1000:.2f} s)",
        f"QEMU key pacing floor {floor_kps:.1f} keys/s; {intact}/{type_reps} lines intact",
    )
    b.report.add(
        "vm_console read, last 50 lines", fmt(reads), f"console.log tail in-process {tail['median_ms'] * 1000:.0f} us"
    )
    b.report.data["console"] = {
        **out,
        "screenshot": shots,
        "screenshot_png": facts,
        "screendump_direct": direct,
        "send_then_wait": s_seq,
        "echo_in_log": s_echo,
        "send": s_send,
        "waiting_reaction": s_react,
        "type": {
            "chars": TYPED_CHARS,
            "seconds": s_type,
            "keys_per_s": round(kps, 1),
            "floor_keys_per_s": round(floor_kps, 1),
            "intact": intact,
            "reps": type_reps,
        },
        "read_50_lines": reads,
        "tail_in_process": tail,
    }
