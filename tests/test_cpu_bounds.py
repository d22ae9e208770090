"""CPU work a client or a guest can make the server do is bounded, and never stalls the event loop.

The reproduction of issue 23: with a ``read`` token, ``vm_console wait`` with a pattern that costs tens of
milliseconds per line of an ordinary 3000-line boot log used to search on the event loop for minutes, while
``/healthz`` and every other client waited.  Here it must keep to its ``timeout`` while a second client and
``/healthz`` are answered within a second.  The times asserted are correctness bounds (a stall of 30 s fails
them by far), not speed goals.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from qemu_mcp_http.console.pattern import MAX_PATTERN_WEIGHT, compile_pattern, pattern_weight
from qemu_mcp_http.errors import InvalidInput
from qemu_mcp_http.mcp.tools import list_vms as list_vms_tool

from .inprocess import open_app
from .support import ServerProcess, open_tools

#: The issue's pattern: about 10-50 ms per line of 40-50 characters, well under the 0.5 s limit per line.
SLOW = r"(.*)(.*)(.*)\1\2\3\d{12}"
MESSAGES = (
    "Linux version 6.1.0-13-cloud-amd64",
    "BIOS-e820: usable memory",
    "ACPI: RSDP 0x00000000000F5A50",
    "pci 0000:00:02.0: [1234:1111]",
    "virtio_blk virtio2: [vda] 2.00 GiB",
    "EXT4-fs (vda1): mounted filesystem",
    "systemd[1]: Started journald",
    "random: crng init done",
    "virtio_net virtio0 enp0s3: renamed",
)


def boot_log(lines: int) -> str:
    """An ordinary kernel boot log, as a guest writes it on its serial console."""
    return "".join(f"[{i * 0.013:12.6f}] {MESSAGES[i % len(MESSAGES)]}\n" for i in range(lines))


@dataclass
class Env:
    server: ServerProcess
    tokens: dict[str, str]

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    @property
    def base(self) -> str:
        return self.server.url.removesuffix("/mcp")


@pytest.fixture(scope="module")
def env(workdir: Path) -> Iterator[Env]:
    root = workdir / "cpu-bounds"
    (root / "vms").mkdir(parents=True)
    tokens = {who: secrets.token_urlsafe(24) for who in ("boss", "reader", "other")}
    (root / "tokens").write_text(
        f"boss {tokens['boss']} admin\nreader {tokens['reader']} read\nother {tokens['other']} read\n"
    )
    with ServerProcess(
        vm_dir=root / "vms",
        env={
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_ALLOWED_ROOTS": str(root),
            "QEMU_MCP_TOKEN_FILE": str(root / "tokens"),
        },
    ) as srv:
        yield Env(srv, tokens)


async def _timed(work: Any, bound: float) -> float:
    """Seconds ``work`` took; ``inf`` when it did not end within ``bound`` (it is then abandoned)."""
    began = time.monotonic()
    try:
        await asyncio.wait_for(work, bound)
    except TimeoutError:
        return float("inf")
    return time.monotonic() - began


async def test_a_slow_pattern_keeps_to_its_timeout_while_others_are_answered(env: Env) -> None:
    """The issue's reproduction: the wait ends by its 5 s timeout; meanwhile /healthz and a second client's
    calls (on an open session, and a new session) each answer within 1 s; /metrics shows no stall."""
    async with open_tools(env.server.url, env.headers("boss")) as boss:
        await boss.ok("manage_vm", name="victim", action="create", arch="x86_64", memory="64M", disk="size=16M")
    (env.server.vm_dir / "victim" / "console.log").write_text(boot_log(3000))
    health: list[float] = []
    calls: list[float] = []
    try:
        async with (
            open_tools(env.server.url, env.headers("reader")) as reader,
            open_tools(env.server.url, env.headers("other")) as other,
            httpx.AsyncClient(base_url=env.base, headers=env.headers("other")) as http,
        ):
            began = time.monotonic()
            wait = asyncio.create_task(
                reader.call("vm_console", name="victim", action="wait", offset=0, timeout=5, pattern=SLOW)
            )
            await asyncio.sleep(0.5)
            while not wait.done() and time.monotonic() - began < 30:
                health.append(await _timed(http.get("/healthz"), 2.0))
                calls.append(await _timed(other.call("list_vms"), 2.0))
                if max(health + calls) == float("inf"):
                    break
                await asyncio.sleep(0.2)
            fresh = await _timed(_list_in_new_session(env), 3.0)  # a new client, after the wait
            answer = await asyncio.wait_for(wait, 30)
            elapsed = time.monotonic() - began
            metrics = (await http.get("/metrics")).text
    finally:
        async with open_tools(env.server.url, env.headers("boss")) as boss:
            await boss.call("manage_vm", name="victim", action="delete")
    assert not answer["success"], answer
    assert "did not appear" in answer["message"] or "simplify the pattern" in answer["message"], answer
    assert elapsed < 5 + 2, f"the wait took {elapsed:.1f} s with timeout 5"
    assert len(health) >= 3 and max(health) < 1.0, health
    assert max(calls) < 1.0, calls
    assert fresh < 3.0
    lag = _histogram(metrics, "qemu_mcp_event_loop_lag_seconds")
    assert lag["+Inf"] > 10, lag  # sampled all along (4 a second)
    assert lag["1.0"] == lag["+Inf"], f"the event loop stalled for more than 1 s: {lag}"
    assert float(re.search(r"^qemu_mcp_cpu_work_seconds_total (\S+)$", metrics, re.M).group(1)) > 1  # type: ignore[union-attr]


async def _list_in_new_session(env: Env) -> None:
    async with open_tools(env.server.url, env.headers("other")) as fresh:
        await fresh.ok("list_vms")


def _histogram(text: str, name: str) -> dict[str, float]:
    return {le: float(value) for le, value in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.MULTILINE)}


@pytest.mark.parametrize(
    "pattern",
    ["((((a{100}){100}){100}){100})", "(?:[^a]{1000}){1000}", "((((a{3}){3}){3}){3}){3}", "(a{99})(?1){9999}"],
)
async def test_a_pattern_that_would_compile_for_minutes_is_refused_at_once(env: Env, pattern: str) -> None:
    """Compiling holds the GIL: ``((((a{100}){100}){100}){100})`` compiled for more than a minute on the event
    loop. Its unrolled size is refused before it is compiled."""
    async with open_tools(env.server.url, env.headers("reader")) as reader:
        answer = await asyncio.wait_for(
            reader.fails("vm_console", name="ghost", action="wait", pattern=pattern, timeout=1), 10
        )
    assert answer["data"]["error"] == "InvalidInput", answer
    assert "too large once its counted repeats are unrolled" in answer["message"] or "group calls" in answer["message"]


def test_pattern_weights() -> None:
    """The size estimate unrolls counted repeats through groups, classes and escapes, and never under-counts
    text it does not parse (a class holding a parenthesis, a braced escape)."""
    assert pattern_weight("login: $") == (8, 0)
    assert pattern_weight(r"\d{12}") == (12, 1)
    assert pattern_weight(r"(?:\d{1,3}\.){3}\d{1,3}") == (3 * (2 + 3 + 1) + 3, 2)  # "?:" counts as two atoms
    assert pattern_weight(r"[)(]{50}x") == (51, 1)
    assert pattern_weight(r"\p{Lu}{40}") == (40, 1)
    assert pattern_weight("[[](?:a{1000}){1000}]")[0] > MAX_PATTERN_WEIGHT  # V0: "[[]" is a class of "["
    assert pattern_weight("[^]a]{20}") == (20, 1)
    for fine in (SLOW, "login: $", r"[0-9a-f]{64}", r".{0,200}$"):
        compile_pattern(fine)
    for bad in ("", "x" * 4097, "(unclosed", "(?V1)[[a]--[b]]"):
        with pytest.raises(InvalidInput):
            compile_pattern(bad)


async def test_a_client_that_spent_its_cpu_budget_is_told_when_to_return(tmp_path: Path) -> None:
    """Per client: 1 CPU second a minute here; the first slow wait spends it, the next is refused at once."""
    async with (
        open_app(tmp_path, pattern_cpu_per_client=1.0, pattern_cpu_per_call=0.6) as app,
        app.tools() as tools,
    ):
        await tools.ok("manage_vm", name="spin", action="create", arch="x86_64", memory="64M", disk="size=16M")
        (app.vm_dir / "spin" / "console.log").write_text(boot_log(3000))
        first = await tools.fails("vm_console", name="spin", action="wait", pattern=SLOW, offset=0, timeout=20)
        assert "this call's CPU budget (0.6 s" in first["message"], first
        for _ in range(6):  # each call spends at most 0.6 s; on a loaded machine, less of its wall time
            second = await tools.fails("vm_console", name="spin", action="wait", pattern=SLOW, offset=0, timeout=20)
            if "this call's CPU budget" not in second["message"]:
                break
        assert second["data"]["error"] == "LimitExceeded", second
        assert "used its CPU budget for console patterns (1 s per minute)" in second["message"], second
        assert "retry" in second["message"]


async def test_list_vms_lists_at_most_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer's rows are bounded (the event loop serializes them): the rest are counted and the answer says
    how to narrow it. The bound is 10,000; 2 here."""
    monkeypatch.setattr(list_vms_tool, "MAX_LISTED_VMS", 2)
    async with open_app(tmp_path) as app, app.tools() as tools:
        await tools.ok("manage_vm", name="alpha", action="create", arch="x86_64", memory="64M", disk="size=16M")
        definition = json.loads((app.vm_dir / "alpha" / "vm.json").read_text())
        for name in ("beta", "gamma"):
            (app.vm_dir / name).mkdir()
            (app.vm_dir / name / "vm.json").write_text(json.dumps({**definition, "name": name}))
        listed = await tools.ok("list_vms")
        assert listed["data"]["vm_count"] == 3 and listed["data"]["truncated"] is True
        assert [vm["name"] for vm in listed["data"]["vms"]] == ["alpha", "beta"]
        assert "the first 2 are listed (data.truncated)" in listed["message"]
        assert "truncated" not in (await tools.ok("list_vms", filter_name="gamma"))["data"]
