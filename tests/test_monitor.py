"""monitor_vm_status against a real booted guest, through the real MCP client over streamable HTTP.

One amd64 guest (tests/guest) boots for the module: it writes 2 MiB/s to its virtio disk, pings the
host twice a second and burns a little CPU, so every metric has something real to show.  The last
test stops it gracefully, which only ends by ACPI when the guest really handles the power button.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from .guest_image import GuestISOs, wait_for_marker
from .support import ServerProcess, ToolClient, alive, kill_vms_under, open_tools

pytestmark = pytest.mark.slow

VM = "mon-guest"
BOOT_TIMEOUT = 60.0


@dataclass
class Progress:
    """Progress notifications of one call, with their arrival times."""

    events: list[tuple[float, float, float | None, str | None]] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    three: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.events.append((time.monotonic(), progress, total, message))
        self.first.set()
        if len(self.events) >= 3:
            self.three.set()


@dataclass(frozen=True)
class Guest:
    name: str
    pid: int
    boot_seconds: float


@pytest.fixture(scope="module")
async def guest(server: ServerProcess, guest_isos: GuestISOs) -> AsyncIterator[Guest]:
    """The amd64 guest, booted to its ready marker; killed by PID afterwards whatever happened."""
    try:
        async with open_tools(server.url) as tools:
            disk = f"path={server.vm_dir.parent / 'mon-guest.qcow2'},size=64M"
            await tools.ok(
                "manage_vm", name=VM, action="create", arch="x86_64", memory="256M", vcpus=1, disk=disk,
                iso=str(guest_isos.amd64),
            )  # fmt: skip
            started = await tools.ok("manage_vm", name=VM, action="start")
            boot = await wait_for_marker(Path(started["data"]["details"]["console_log"]), BOOT_TIMEOUT)
            yield Guest(VM, int(started["data"]["details"]["pid"]), boot)
    finally:
        kill_vms_under(server.vm_dir / VM)


async def monitor(tools: ToolClient, progress: Progress | None = None, **arguments: Any) -> dict[str, Any]:
    result = await tools.client.call_tool("monitor_vm_status", arguments, progress_callback=progress)
    assert result.structured_content is not None, result
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
    return dict(result.structured_content)


async def test_samples_stream_as_progress(tools: ToolClient, guest: Guest) -> None:
    """count=3, interval=1: three notifications in order, about a second apart, carrying the samples; all move."""
    progress = Progress()
    began = time.monotonic()
    answer = await monitor(tools, progress, name=guest.name, count=3, interval=1)
    took = time.monotonic() - began
    assert answer["success"], answer
    assert answer["message"] == f"Successfully obtained 3 sampling data points for {guest.name}"
    data = answer["data"]
    samples = data["metrics_data"]
    assert data["vm_name"] == guest.name and data["host"] == "localhost"
    assert len(samples) == len(data["timestamp"]) == 3
    assert 1.8 < took < 6, took  # samples at 0, 1 and 2 s

    # One notification per sample, the moment it is taken: progress n of total 3, the sample as JSON.
    assert [(p, t) for _, p, t, _ in progress.events] == [(1, 3), (2, 3), (3, 3)]
    assert [json.loads(m or "") for *_, m in progress.events] == samples
    gaps = [b[0] - a[0] for a, b in zip(progress.events, progress.events[1:], strict=False)]
    assert all(0.5 < g < 2.0 for g in gaps), gaps

    stamps = [dt.datetime.fromisoformat(t) for t in data["timestamp"]]
    assert all(s.utcoffset() == dt.timedelta(0) for s in stamps)
    assert stamps == sorted(stamps) and [s["timestamp"] for s in samples] == data["timestamp"]
    for sample in samples:
        assert {"cpu", "memory", "disk", "network"} <= sample.keys(), sample
    first, last = samples[0], samples[-1]
    assert first["rates_over"] == "since_vm_start" and last["rates_over"] == "interval"

    # CPU: the QEMU process runs the guest, so its CPU time moves and the rate is above zero.
    assert last["cpu"]["vcpu_count"] == 1 and len(last["cpu"]["vcpus"]) == 1
    assert last["cpu"]["process_cpu_seconds"] > first["cpu"]["process_cpu_seconds"]
    assert all(s["cpu"]["process_cpu_percent"] > 0 for s in samples)
    assert last["cpu"]["vcpus"][0]["cpu_seconds"] > 0

    # Memory: configured size, QEMU's RSS and the balloon.
    mem = last["memory"]
    assert mem["configured_bytes"] == 256 << 20
    assert mem["qemu_rss_bytes"] > 0 and mem["balloon_actual_bytes"] == 256 << 20

    # Disk: the guest writes 1 MiB twice a second to its virtio disk; the ISO is not written.
    before, after = first["disk"]["devices"]["disk0"], last["disk"]["devices"]["disk0"]
    assert after["write_bytes"] > before["write_bytes"] > 0
    assert after["write_ops"] > before["write_ops"]
    assert after["write_bytes_per_s"] > 0
    assert after["virtual_size_bytes"] == 64 << 20 and after["allocated_bytes"] > 0
    assert last["disk"]["devices"]["cd0"]["write_bytes"] == 0

    # Network: user-mode net has no host counter; the guest agent in the guest reports eth0's.
    net_before, net_after = first["network"], last["network"]
    assert net_after["source"] == "guest-agent", net_after
    assert net_after["nic0"]["tx_bytes"] > net_before["nic0"]["tx_bytes"]
    assert net_after["nic0"]["tx_packets"] > net_before["nic0"]["tx_packets"]
    assert net_after["nic0"]["rx_bytes"] > net_before["nic0"]["rx_bytes"]
    assert net_after["nic0"]["tx_bytes_per_s"] > 0


async def test_metrics_filter(tools: ToolClient, guest: Guest) -> None:
    """metrics=disk samples only the disk."""
    answer = await monitor(tools, name=guest.name, metrics="disk", count=1, interval=1)
    assert answer["success"], answer
    (sample,) = answer["data"]["metrics_data"]
    assert "disk" in sample and not {"cpu", "memory", "network"} & sample.keys()
    assert answer["data"]["metrics"] == "disk"


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"interval": 0.5}, ("interval", "from 1 to")),
        ({"count": -1}, ("count", ">= 0")),
        ({"metrics": "gpu"}, ("metrics",)),
    ],
)
async def test_invalid_arguments(tools: ToolClient, guest: Guest, arguments: dict[str, Any], words: tuple[str]) -> None:
    """Out-of-range interval/count and an unknown metric are refused with a message naming the field."""
    result = await tools.client.call_tool("monitor_vm_status", {"name": guest.name, **arguments})
    assert result.is_error
    text = result.content[0].text  # type: ignore[union-attr]
    if result.structured_content is not None:
        assert result.structured_content["success"] is False
        text = result.structured_content["message"]
    for word in words:
        assert word in text, text


async def test_not_running_or_unknown(tools: ToolClient, server: ServerProcess, guest: Guest) -> None:
    """A stopped or unknown VM: success false and a message that says why."""
    name = "mon-stopped"
    try:
        await tools.ok("manage_vm", name=name, action="create", arch="x86_64", memory="128M", disk="size=16M")
        stopped = await tools.fails("monitor_vm_status", name=name, count=1, interval=1)
        assert "not running" in stopped["message"] and "start it" in stopped["message"], stopped
        await tools.ok("manage_vm", name=name, action="delete")
    finally:
        kill_vms_under(server.vm_dir / name)
    unknown = await tools.fails("monitor_vm_status", name="mon-no-such-vm", count=1, interval=1)
    assert "not found" in unknown["message"], unknown


async def test_count_zero_until_cancelled(tools: ToolClient, server: ServerProcess, guest: Guest) -> None:
    """count=0 streams until the client cancels; the server then frees the stream and stays healthy."""
    progress = Progress()
    call = asyncio.create_task(monitor(tools, progress, name=guest.name, metrics="cpu", count=0, interval=1))
    await asyncio.wait_for(progress.three.wait(), 10)
    assert [p for _, p, _, _ in progress.events[:3]] == [1, 2, 3]
    assert all(t is None for _, _, t, _ in progress.events)  # no total: open-ended
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    seen = len(progress.events)
    await asyncio.sleep(1.5)
    assert len(progress.events) == seen  # nothing more arrives for the cancelled request

    assert httpx.get(server.url.removesuffix("/mcp") + "/healthz", timeout=5).json()["status"] == "ok"
    assert alive(guest.pid)
    # The cancelled stream gave its slot back: the per-client limit (4) still admits four at once.
    answers = await asyncio.gather(
        *(monitor(tools, name=guest.name, metrics="cpu", count=1, interval=1) for _ in range(4))
    )
    assert all(a["success"] for a in answers), answers


async def test_graceful_stop_by_acpi(tools: ToolClient, server: ServerProcess, guest: Guest) -> None:
    """Runs last in this module: stop presses the power button and the guest powers itself off.

    A count=0 monitor running meanwhile ends with a clear error and keeps the samples it took.
    """
    progress = Progress()
    watching = asyncio.create_task(monitor(tools, progress, name=guest.name, count=0, interval=1))
    await asyncio.wait_for(progress.first.wait(), 5)
    began = time.monotonic()
    stopped = await tools.ok("manage_vm", name=guest.name, action="stop", stop_timeout=20)
    details = stopped["data"]["details"]
    assert details["stopped_by"] == "acpi", stopped
    assert details["stop_seconds"] < 10 and time.monotonic() - began < 12
    assert not alive(guest.pid)
    assert "power button pressed" in (server.vm_dir / guest.name / "console.log").read_text(errors="replace")

    ended = await asyncio.wait_for(watching, 5)
    assert not ended["success"] and "no longer running" in ended["message"], ended
    assert ended["data"]["count"] == len(ended["data"]["metrics_data"]) >= 1
    after = await tools.fails("monitor_vm_status", name=guest.name, count=1, interval=1)
    assert "not running" in after["message"]
