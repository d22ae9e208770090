"""The real test guest itself: its cache, arm64 boot under TCG with UEFI, and graceful stops by ACPI."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

import pytest

from .buildcache import build_directory
from .guest_image import GUEST_SRC, GuestISOs, build_guest_isos, wait_for_marker
from .support import ServerProcess, ToolClient

pytestmark = pytest.mark.slow

ARM64_BOOT_TIMEOUT = 90.0


def test_cache_reused_and_locked(guest_isos: GuestISOs) -> None:
    """A second build reuses the cached ISOs, and waits while another run holds the cache lock."""
    began = time.monotonic()
    again = build_guest_isos()
    assert time.monotonic() - began < 1.0
    assert again.amd64.parent == build_directory("QEMU_MCP_GUEST_CACHE", "guest", GUEST_SRC)
    assert again.amd64.stat().st_size == guest_isos.amd64.stat().st_size > 1 << 20
    assert again.arm64.stat().st_size == guest_isos.arm64.stat().st_size > 1 << 20

    done = threading.Event()

    def build() -> None:
        build_guest_isos()
        done.set()

    with open(again.amd64.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=build)
        waiter.start()
        assert not done.wait(0.5)  # blocked on our lock
    waiter.join(10)
    assert done.is_set()


async def test_arm64_boots_and_stops_by_acpi(
    tools: ToolClient,
    server: ServerProcess,
    guest_isos: GuestISOs,
    vm_name: str,
) -> None:
    """arm64 (virt, cortex-a57, UEFI) boots the ISO to the marker under TCG, writes its disk, stops by ACPI."""
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="arm64", memory="256M", vcpus=1, disk="size=64M",
        iso=str(guest_isos.arm64),
    )  # fmt: skip
    started = await tools.ok("manage_vm", name=vm_name, action="start")
    console = Path(started["data"]["details"]["console_log"])
    await wait_for_marker(console, ARM64_BOOT_TIMEOUT)
    assert "aarch64" in console.read_text(errors="replace")

    answer = await tools.ok("monitor_vm_status", name=vm_name, metrics="disk", count=2, interval=1)
    first, last = (s["disk"]["devices"]["disk0"] for s in answer["data"]["metrics_data"])
    assert last["write_bytes"] > first["write_bytes"] > 0
    # The UEFI flash drives are firmware, not disks.
    assert set(answer["data"]["metrics_data"][0]["disk"]["devices"]) == {"disk0", "cd0"}

    stopped = await tools.ok("manage_vm", name=vm_name, action="stop", stop_timeout=20)
    assert stopped["data"]["details"]["stopped_by"] == "acpi", stopped
    assert stopped["data"]["details"]["stop_seconds"] < 10
    assert "power button pressed" in console.read_text(errors="replace")
    await tools.ok("manage_vm", name=vm_name, action="delete")


async def test_modify_restarts_real_guest_by_acpi(
    tools: ToolClient,
    server: ServerProcess,
    guest_isos: GuestISOs,
    vm_name: str,
) -> None:
    """modify of memory on a running guest shuts it down by ACPI and boots it again with the new size."""
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="x86_64", memory="256M", vcpus=1, disk="size=64M",
        iso=str(guest_isos.amd64),
    )  # fmt: skip
    started = await tools.ok("manage_vm", name=vm_name, action="start")
    console = Path(started["data"]["details"]["console_log"])
    await wait_for_marker(console, 60)

    modified = await tools.ok("manage_vm", name=vm_name, action="modify", memory="320M", stop_timeout=20)
    details = modified["data"]["details"]
    assert details["stopped_by"] == "acpi" and details["restarted"] is True, details
    assert details["after"]["memory"] == "320M"
    # The console log is rewritten by the new QEMU; the guest boots to the marker again.
    await wait_for_marker(console, 60)
    sample = (await tools.ok("monitor_vm_status", name=vm_name, metrics="memory", count=1, interval=1))["data"]
    assert sample["metrics_data"][0]["memory"]["configured_bytes"] == 320 << 20
    stopped = await tools.ok("manage_vm", name=vm_name, action="stop", stop_timeout=20)
    assert stopped["data"]["details"]["stopped_by"] == "acpi"
    await tools.ok("manage_vm", name=vm_name, action="delete")
