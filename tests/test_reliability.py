"""Faults and load with real QEMU and a real server process: hung and killed VMs, races, leaks."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

from .support import (
    ServerProcess,
    ToolClient,
    kill_groups,
    kill_vms_under,
    open_tools,
    pid_of,
    pids_running,
    slow_command_path,
    wait_for,
)


def fds_and_rss(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return fds, int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def fault_server(workdir: Path) -> Iterator[ServerProcess]:
    (workdir / "fault-vms").mkdir()
    with ServerProcess(
        vm_dir=workdir / "fault-vms",
        env={"QEMU_MCP_ACCEL": "tcg", "QEMU_MCP_QMP_TIMEOUT": "1", "QEMU_MCP_MAX_MONITOR_STREAMS_PER_CLIENT": "64"},
    ) as srv:
        yield srv


async def make_running(t: ToolClient, name: str) -> None:
    await t.ok("manage_vm", name=name, action="create", arch="x86_64", memory="128M", vcpus=1, disk="size=64M")
    await t.ok("manage_vm", name=name, action="start")


async def test_hung_qemu_answers_in_bounded_time(fault_server: ServerProcess) -> None:
    async with open_tools(fault_server.url) as t:
        await make_running(t, "hung")
        pid = pid_of(fault_server.vm_dir, "hung")
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            listed = await t.ok("list_vms", filter_name="hung")
            assert time.monotonic() - began < 5
            vm = listed["data"]["vms"][0]
            assert vm["status"] == "running" and vm.get("run_state") in (None, "unresponsive", "unknown"), vm
            began = time.monotonic()
            stopped = await t.ok("manage_vm", name="hung", action="stop", stop_timeout=1)
            assert time.monotonic() - began < 15
            assert stopped["data"]["details"]["stopped_by"] == "sigkill"
        finally:
            os.kill(pid, signal.SIGCONT) if Path(f"/proc/{pid}").exists() else None
        await t.ok("manage_vm", name="hung", action="delete")


async def test_qemu_killed_during_monitor(fault_server: ServerProcess) -> None:
    async with open_tools(fault_server.url) as t:
        await make_running(t, "victim")
        pid = pid_of(fault_server.vm_dir, "victim")
        samples: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            samples.append(progress)
            if len(samples) == 2:
                os.kill(pid, signal.SIGKILL)

        result = await asyncio.wait_for(
            t.client.call_tool(
                "monitor_vm_status",
                {"name": "victim", "metrics": "cpu", "interval": 1, "count": 10},
                progress_callback=on_progress,
            ),
            30,
        )
        envelope = result.structured_content
        assert envelope is not None and envelope["success"] is False
        # The kill lands while the client handles sample 2; a third may already be on its way.
        taken = len(envelope["data"]["metrics_data"])
        assert taken in (2, 3) and f"after {taken} samples" in envelope["message"], envelope["message"]
        assert "no longer running" in envelope["message"]
        listed = await t.ok("list_vms", filter_name="victim")
        assert listed["data"]["vms"][0]["status"] == "stopped"
        await t.ok("manage_vm", name="victim", action="delete")


async def test_concurrent_creates_one_wins(fault_server: ServerProcess) -> None:
    async with open_tools(fault_server.url) as t:
        answers = await asyncio.gather(
            *(t.call("manage_vm", name="racer", action="create", arch="x86_64", disk="size=64M") for _ in range(8))
        )
        assert sum(a["success"] for a in answers) == 1
        assert all("already exists" in a["message"] for a in answers if not a["success"])
        # start racing delete: either order, the end state is consistent.
        racing = await asyncio.gather(
            t.call("manage_vm", name="racer", action="start"),
            t.call("manage_vm", name="racer", action="delete", stop_timeout=1),
        )
        delete = racing[1]
        assert delete["success"], delete
        assert not (fault_server.vm_dir / "racer").exists()
        assert (await t.ok("list_vms", filter_name="racer"))["data"]["vm_count"] == 0
        kill_vms_under(fault_server.vm_dir / "racer")  # nothing should be left; belt and braces


async def test_load_without_leaks(fault_server: ServerProcess) -> None:
    """Rounds of 50 concurrent mixed calls (200 measured): answers right, fds and RSS flat across rounds."""
    assert fault_server.proc is not None
    server_pid = fault_server.proc.pid
    async with open_tools(fault_server.url) as t:
        names = [f"load-{i}" for i in range(4)]
        for name in names:
            await make_running(t, name)

        async def round_of_50() -> list[dict[str, Any]]:
            batch = []
            for i in range(50):
                kind = i % 5
                if kind in (0, 1, 2):
                    batch.append(t.call("list_vms", status="running"))
                elif kind == 3:
                    batch.append(t.call("monitor_vm_status", name=names[i % 4], metrics="all", interval=1, count=2))
                else:
                    batch.append(t.call("manage_vm", name=names[i % 4], action="start"))
            return list(await asyncio.gather(*batch))

        # One round first: the client's keep-alive connections and the shared QMP connections are part of the
        # steady state; a leak is growth over the following rounds.
        await round_of_50()
        baseline = fds_and_rss(server_pid)
        calls = failures = 0
        for _ in range(4):
            answers = await round_of_50()
            calls += len(answers)
            failures += sum(not a["success"] for a in answers)
            for a in answers:
                if not a["success"]:
                    print("FAILED:", a["message"])
                if "vm_count" in a["data"]:
                    assert a["data"]["vm_count"] == len(names)
        after = fds_and_rss(server_pid)
        for name in names:
            await t.ok("manage_vm", name=name, action="delete", stop_timeout=1)
    print(f"load: {calls} calls, {failures} failures, fds {baseline[0]}->{after[0]}, RSS {baseline[1]}->{after[1]} KiB")
    assert failures == 0
    # A per-call leak would add hundreds; keep-alive connections of the client may add a few.
    assert after[0] <= baseline[0] + 10
    assert after[1] <= baseline[1] + 30 * 1024


async def test_lock_file_shared_with_another_process(workdir: Path) -> None:
    """A second server process on the same vm_dir takes the same per-VM lock file (here: the test holds it)."""
    (workdir / "lock-vms").mkdir()
    env = {"QEMU_MCP_ACCEL": "tcg", "QEMU_MCP_LOCK_TIMEOUT": "1"}
    with ServerProcess(vm_dir=workdir / "lock-vms", env=env) as srv:
        async with open_tools(srv.url) as t:
            await t.ok(
                "manage_vm", name="locked", action="create", arch="x86_64", memory="64M", vcpus=1, disk="size=16M"
            )
            lock_path = srv.vm_dir / ".locks" / "locked.lock"
            assert lock_path.exists()
            fd = os.open(lock_path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                began = time.monotonic()
                answer = await t.fails("manage_vm", name="locked", action="start")
                assert time.monotonic() - began < 5
                assert "another process held the lock" in answer["message"]
                assert not (srv.vm_dir / "locked" / "qemu.pid").exists()
            finally:
                os.close(fd)
            await t.ok("manage_vm", name="locked", action="start")
            await t.ok("manage_vm", name="locked", action="delete", stop_timeout=1)
            listed = await t.ok("list_vms")
            assert listed["data"]["vm_count"] == 0 and "incomplete" not in listed["data"]


async def test_server_killed_during_create(workdir: Path) -> None:
    vm_dir = workdir / "crash-vms"
    vm_dir.mkdir()
    # qemu-img create sleeps first: the server can be killed in the middle of create.
    slow = slow_command_path(workdir / "crash-bin", "qemu-img", when_args_match="create *")
    shims: list[int] = []
    try:
        with ServerProcess(vm_dir=vm_dir, env={"QEMU_MCP_ACCEL": "tcg", "PATH": slow}) as srv:
            try:
                async with open_tools(srv.url) as t:
                    create = asyncio.create_task(
                        t.call("manage_vm", name="halfway", action="create", arch="x86_64", disk="size=16M")
                    )

                    async def shim_running() -> bool:
                        shims[:] = pids_running(f"{workdir}/crash-bin/qemu-img create")
                        return bool(shims)

                    assert await wait_for(shim_running, 10)
                    assert (vm_dir / "halfway").is_dir()
                    srv.stop(signal.SIGKILL)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(create, 10)
            except* (httpx.HTTPError, MCPError):
                pass  # the session dies with the server: that is the point
            kill_groups(shims)  # the orphaned qemu-img of the dead server, with its sleep

            with ServerProcess(vm_dir=vm_dir, env={"QEMU_MCP_ACCEL": "tcg"}) as srv:
                async with open_tools(srv.url) as t:
                    listed = await t.ok("list_vms")
                    assert listed["data"]["vm_count"] == 0  # never counted as a VM ...
                    assert listed["data"]["incomplete"] == ["halfway"]  # ... but reported
                    assert "1 entry that is not a usable VM" in listed["message"]
                    again = await t.fails("manage_vm", name="halfway", action="create", arch="x86_64", disk="size=16M")
                    assert "holds no VM definition" in again["message"] and "delete removes" in again["message"]
                    # delete cleans what the interrupted create made (its directory and journal), and only that.
                    cleaned = await t.ok("manage_vm", name="halfway", action="delete")
                    assert cleaned["data"]["details"]["removed"] == [str(vm_dir / "halfway")], cleaned
                    assert "incomplete" in cleaned["data"]["details"]["note"]
                    assert not (vm_dir / "halfway").exists() and not (vm_dir / ".locks" / "halfway.lock").exists()
                    await t.ok(
                        "manage_vm", name="halfway", action="create", arch="x86_64", memory="64M", disk="size=16M"
                    )
                    listed = await t.ok("list_vms")
                    assert listed["data"]["vm_count"] == 1 and "incomplete" not in listed["data"]
                    await t.ok("manage_vm", name="halfway", action="delete")
    finally:
        kill_groups(shims)


async def test_monitor_cut_by_server_restart(workdir: Path) -> None:
    """SIGTERM while a count=0 monitor streams: the client's call ends with an error, the VM runs on."""
    vm_dir = workdir / "monitor-restart-vms"
    vm_dir.mkdir()
    with ServerProcess(vm_dir=vm_dir, env={"QEMU_MCP_ACCEL": "tcg"}) as srv:
        async with open_tools(srv.url) as t:
            await make_running(t, "steady")
        pid = pid_of(vm_dir, "steady")
        seen = asyncio.Event()
        outcome: list[object] = []
        try:
            async with open_tools(srv.url) as t:

                async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                    if progress >= 2:
                        seen.set()

                async def monitor() -> None:
                    try:
                        outcome.append(
                            await t.client.call_tool(
                                "monitor_vm_status",
                                {"name": "steady", "interval": 1, "count": 0},
                                progress_callback=on_progress,
                            )
                        )
                    except Exception as exc:  # noqa: BLE001 - any transport error is the expected outcome
                        outcome.append(exc)

                call = asyncio.create_task(monitor())
                await asyncio.wait_for(seen.wait(), 20)
                began = time.monotonic()
                srv.stop()  # SIGTERM: a graceful shutdown
                stopped_in = time.monotonic() - began
                await asyncio.wait_for(call, 20)
        except* (httpx.HTTPError, MCPError):
            pass
        assert stopped_in < 5, stopped_in  # an open-ended stream must not hold uvicorn's 10 s graceful window
        result = outcome[0]
        assert isinstance(result, CallToolResult), result
        envelope = result.structured_content
        assert envelope and not envelope["success"], envelope
        assert "shutting down" in envelope["message"] and "keeps running" in envelope["message"]
        assert envelope["data"]["count"] >= 2  # the samples taken are kept
        assert Path(f"/proc/{pid}").exists(), "the VM must survive the server"

        with ServerProcess(vm_dir=vm_dir, env={"QEMU_MCP_ACCEL": "tcg"}) as srv:
            async with open_tools(srv.url) as t:
                vm = (await t.ok("list_vms", filter_name="steady"))["data"]["vms"][0]
                assert vm["status"] == "running" and vm["pid"] == pid
                await t.ok("manage_vm", name="steady", action="delete", stop_timeout=1)


async def test_two_servers_share_a_vm_dir(workdir: Path) -> None:
    """QEMU serves one QMP client at a time: a server lets go of an idle QMP connection, so that a
    second server on the same vm_dir sees the VM running, not unresponsive."""
    vm_dir = workdir / "shared-vms"
    vm_dir.mkdir()
    with (
        ServerProcess(vm_dir=vm_dir, env={"QEMU_MCP_ACCEL": "tcg"}) as first,
        ServerProcess(vm_dir=vm_dir, env={"QEMU_MCP_ACCEL": "tcg"}) as second,
    ):
        async with open_tools(first.url) as a, open_tools(second.url) as b:
            await make_running(a, "shared")
            await asyncio.sleep(2.5)  # past the first server's QMP idle time
            vm = (await b.ok("list_vms"))["data"]["vms"][0]
            assert (vm["status"], vm["run_state"]) == ("running", "running"), vm
            await asyncio.sleep(2.5)
            stopped = await a.ok("manage_vm", name="shared", action="stop", stop_timeout=1)
            assert stopped["data"]["details"]["stopped_by"] in ("quit", "acpi"), stopped  # QMP answered
            assert (await b.ok("list_vms"))["data"]["vms"][0]["status"] == "stopped"
