"""manage_vm and list_vms over streamable HTTP against real QEMU (no bootable media needed here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from .inprocess import InProcess
from .support import ServerProcess, ToolClient, alive, open_tools, pid_of, wait_for

# A guest without media never answers ACPI: a short stop_timeout makes stop fall through to QMP quit quickly.
QUICK_STOP = 1.0


async def test_tools_and_schemas(inproc_tools: ToolClient) -> None:
    listed = {t.name: t for t in (await inproc_tools.client.list_tools()).tools}
    assert set(listed) == {"manage_vm", "list_vms", "monitor_vm_status", "vm_guest", "vm_console", "vm_snapshot"}
    assert listed["vm_guest"].annotations is not None and listed["vm_guest"].annotations.destructive_hint is True
    manage = listed["manage_vm"]
    props = manage.input_schema["properties"]
    for param in ("name", "action", "arch", "memory", "disk", "iso", "vcpus", "vm_dir", "host", "ssh_port"):
        assert param in props, param
    assert manage.annotations is not None and manage.annotations.destructive_hint is True
    assert listed["list_vms"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert listed["monitor_vm_status"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert json.dumps(manage.input_schema).count("create") >= 1
    assert "ssh_pwd" not in manage.input_schema.get("required", [])


async def test_x86_round_trip(tools: ToolClient, server: ServerProcess, vm_name: str) -> None:
    vm_dir = server.vm_dir
    created = await tools.ok("manage_vm", name=vm_name, action="create", arch="amd64", memory="256M", vcpus=1)
    assert created["message"] == f"VM {vm_name} created successfully"
    assert created["data"]["host"] == "localhost" and created["data"]["action"] == "create"
    disk_path = vm_dir / vm_name / f"{vm_name}.qcow2"
    assert created["data"]["details"]["disk"]["path"] == str(disk_path)
    assert disk_path.exists()
    definition = json.loads((vm_dir / vm_name / "vm.json").read_text())
    assert definition["arch"] == "x86_64" and definition["memory_mib"] == 256

    listed = await tools.ok("list_vms", filter_name=vm_name.upper())
    assert [v["status"] for v in listed["data"]["vms"]] == ["stopped"]

    started = await tools.ok("manage_vm", name=vm_name, action="start")
    assert "started" in started["message"]
    pid = pid_of(vm_dir, vm_name)
    assert b"qemu-system-x86_64" in Path(f"/proc/{pid}/cmdline").read_bytes()
    again = await tools.ok("manage_vm", name=vm_name, action="start")
    assert "already running" in again["message"]

    running = await tools.ok("list_vms", status="running", arch="x86_64", filter_name=vm_name)
    vm = running["data"]["vms"][0]
    assert (vm["name"], vm["arch"], vm["vcpus"], vm["memory"], vm["status"]) == (
        vm_name,
        "x86_64",
        1,
        "256M",
        "running",
    )
    assert vm["disk"]["path"] == str(disk_path) and vm["disk"]["size"] == "20G"
    assert running["data"]["vm_count"] == 1
    assert (await tools.ok("list_vms", status="stopped", filter_name=vm_name))["data"]["vm_count"] == 0
    assert (await tools.ok("list_vms", arch="arm64", filter_name=vm_name))["data"]["vm_count"] == 0

    # Grow the disk while running (block_resize), then memory + vcpus (restart).
    grown = await tools.ok("manage_vm", name=vm_name, action="modify", disk="size=25G")
    assert grown["data"]["details"]["before"]["disk"]["size"] == "20G"
    assert grown["data"]["details"]["after"]["disk"]["size"] == "25G"
    shrink = await tools.fails("manage_vm", name=vm_name, action="modify", disk="size=10G")
    assert "shrink" in shrink["message"]
    modified = await tools.ok(
        "manage_vm", name=vm_name, action="modify", memory="512M", vcpus=2, stop_timeout=QUICK_STOP
    )
    details = modified["data"]["details"]
    assert details["before"]["memory"] == "256M" and details["after"]["memory"] == "512M"
    assert details["after"]["vcpus"] == 2
    new_pid = pid_of(vm_dir, vm_name)
    assert new_pid != pid and b"512M" in Path(f"/proc/{new_pid}/cmdline").read_bytes()
    assert not alive(pid)

    stopped = await tools.ok("manage_vm", name=vm_name, action="stop", stop_timeout=QUICK_STOP)
    assert stopped["data"]["details"]["stopped_by"] in ("quit", "acpi")
    assert not alive(new_pid)
    assert not (vm_dir / vm_name / "qmp.sock").exists()
    assert "already stopped" in (await tools.ok("manage_vm", name=vm_name, action="stop"))["message"]

    # Stopped: qemu-img grows the disk.
    await tools.ok("manage_vm", name=vm_name, action="modify", disk="size=30G")
    assert (await tools.ok("list_vms", filter_name=vm_name))["data"]["vms"][0]["disk"]["size"] == "30G"

    deleted = await tools.ok("manage_vm", name=vm_name, action="delete")
    assert str(disk_path) in deleted["data"]["details"]["removed"]
    assert not (vm_dir / vm_name).exists()
    assert (await tools.ok("list_vms", filter_name=vm_name))["data"]["vm_count"] == 0


async def test_arm64_start_stop_tcg(tools: ToolClient, server: ServerProcess, vm_name: str) -> None:
    await tools.ok("manage_vm", name=vm_name, action="create", arch="aarch64", memory="256M", vcpus=1, disk="size=1G")
    assert (server.vm_dir / vm_name / "efivars.fd").stat().st_size > 0
    await tools.ok("manage_vm", name=vm_name, action="start")
    cmdline = Path(f"/proc/{pid_of(server.vm_dir, vm_name)}/cmdline").read_bytes()
    assert b"qemu-system-aarch64" in cmdline and b"cortex-a57" in cmdline
    listed = await tools.ok("list_vms", arch="arm64", status="running", filter_name=vm_name)
    assert listed["data"]["vms"][0]["arch"] == "arm64"
    await tools.ok("manage_vm", name=vm_name, action="stop", stop_timeout=QUICK_STOP)
    await tools.ok("manage_vm", name=vm_name, action="delete")


async def test_attached_and_raw_disks(tools: ToolClient, workdir: Path, vm_name: str) -> None:
    outside = workdir / f"{vm_name}-keep.img"
    created = await tools.ok("manage_vm", name=vm_name, action="create", arch="x86_64", disk=f"path={outside},size=64M")
    assert created["data"]["details"]["disk"]["format"] == "raw"
    assert outside.stat().st_size == 64 << 20
    refused = await tools.fails("manage_vm", name=vm_name, action="modify", disk="size=128M")
    assert "raw" in refused["message"]
    await tools.ok("manage_vm", name=vm_name, action="delete")
    assert not outside.exists()  # the tool created it, so delete removes it
    # A disk that existed before create is attached, never deleted.
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(outside), "64M"], check=True)
    other = f"{vm_name}-b"
    created = await tools.ok("manage_vm", name=other, action="create", arch="x86_64", disk=f"path={outside}")
    assert created["data"]["details"]["disk"]["size"] == "64M"
    deleted = await tools.ok("manage_vm", name=other, action="delete")
    assert str(outside) in deleted["data"]["details"]["kept"]
    assert outside.exists()


async def test_killed_vm_shows_stopped_and_restarts(tools: ToolClient, server: ServerProcess, vm_name: str) -> None:
    await tools.ok("manage_vm", name=vm_name, action="create", arch="x86_64", memory="128M", vcpus=1)
    await tools.ok("manage_vm", name=vm_name, action="start")
    os.kill(pid_of(server.vm_dir, vm_name), signal.SIGKILL)

    async def shows_stopped() -> bool:
        listed = await tools.ok("list_vms", filter_name=vm_name)
        return bool(listed["data"]["vms"][0]["status"] == "stopped")

    assert await wait_for(shows_stopped, timeout=5)
    await tools.ok("manage_vm", name=vm_name, action="start")
    assert (await tools.ok("list_vms", filter_name=vm_name))["data"]["vms"][0]["status"] == "running"
    await tools.ok("manage_vm", name=vm_name, action="delete", stop_timeout=QUICK_STOP)


async def test_vms_outlive_server_restart(workdir: Path) -> None:
    (workdir / "restart-vms").mkdir()
    with ServerProcess(vm_dir=workdir / "restart-vms", env={"QEMU_MCP_ACCEL": "tcg"}) as srv:
        async with open_tools(srv.url) as t:
            await t.ok("manage_vm", name="survivor", action="create", arch="x86_64", memory="128M", vcpus=1)
            await t.ok("manage_vm", name="idle", action="create", arch="x86_64", memory="128M", vcpus=1)
            await t.ok("manage_vm", name="survivor", action="start")
        pid = pid_of(srv.vm_dir, "survivor")
        srv.stop()
        assert alive(pid)
        srv.start()
        async with open_tools(srv.url) as t:
            listed = await t.ok("list_vms")
            assert {v["name"]: v["status"] for v in listed["data"]["vms"]} == {"survivor": "running", "idle": "stopped"}
            await t.ok("manage_vm", name="survivor", action="stop", stop_timeout=QUICK_STOP)
        assert not alive(pid)


@pytest.mark.parametrize(
    ("arguments", "field_fragment"),
    [
        ({"action": "reboot"}, "action"),
        ({"action": "create"}, "arch"),
        ({"action": "create", "arch": "riscv64"}, "x86_64"),
        ({"action": "create", "arch": "x86_64", "memory": "lots"}, "memory"),
        ({"action": "create", "arch": "x86_64", "memory": "0M"}, "memory"),
        ({"action": "create", "arch": "x86_64", "vcpus": 0}, "vcpus"),
        ({"action": "create", "arch": "x86_64", "vcpus": -2}, "vcpus"),
        ({"action": "create", "arch": "x86_64", "disk": "size=twenty"}, "disk"),
        ({"action": "create", "arch": "x86_64", "disk": "/data/disk.qcow2"}, "disk"),
        ({"action": "create", "arch": "x86_64", "disk": "path=relative.qcow2"}, "absolute"),
        ({"action": "create", "arch": "x86_64", "iso": "/nonexistent/x.iso"}, "iso"),
        ({"action": "create", "arch": "x86_64", "iso": "-cdrom"}, "iso"),
        ({"action": "create", "arch": "x86_64", "vm_dir": "relative/dir"}, "vm_dir"),
        ({"action": "start"}, "not found"),
        ({"action": "stop"}, "not found"),
        ({"action": "delete"}, "not found"),
        ({"action": "modify", "memory": "1G"}, "not found"),
    ],
)
async def test_bad_input(
    inproc_tools: ToolClient,
    inproc: InProcess,
    inproc_vm_name: str,
    arguments: dict[str, object],
    field_fragment: str,
) -> None:
    answer = await inproc_tools.fails("manage_vm", name=inproc_vm_name, **arguments)
    assert field_fragment.lower() in answer["message"].lower(), answer
    assert "Traceback" not in json.dumps(answer)
    assert not (inproc.vm_dir / inproc_vm_name).exists()  # nothing half-done


@pytest.mark.parametrize("name", ["-rf", "../etc", "a b", "x" * 64, ""])
async def test_unsafe_names(inproc_tools: ToolClient, inproc: InProcess, name: str) -> None:
    answer = await inproc_tools.fails("manage_vm", name=name, action="create", arch="x86_64")
    assert "name" in answer["message"]
    assert sorted(p.name for p in inproc.vm_dir.iterdir() if p.name.startswith(("-", ".."))) == []


async def test_duplicate_and_modify_errors(tools: ToolClient, server: ServerProcess, vm_name: str) -> None:
    await tools.ok("manage_vm", name=vm_name, action="create", arch="x86_64", memory="128M", vcpus=1)
    dup = await tools.fails("manage_vm", name=vm_name, action="create", arch="x86_64")
    assert "already exists" in dup["message"]
    assert "nothing" in (await tools.fails("manage_vm", name=vm_name, action="modify"))["message"].lower()
    assert "vcpus" in (await tools.fails("manage_vm", name=vm_name, action="modify", vcpus=0))["message"]
    assert (
        "move"
        in (await tools.fails("manage_vm", name=vm_name, action="modify", disk=f"path={server.vm_dir}/x.qcow2"))[
            "message"
        ]
    )
    await tools.ok("manage_vm", name=vm_name, action="delete")


async def test_list_vms_bad_input(inproc_tools: ToolClient) -> None:
    assert "status" in (await inproc_tools.fails("list_vms", status="paused"))["message"]
    assert "arch" in (await inproc_tools.fails("list_vms", arch="sparc"))["message"]
    assert "vm_dir" in (await inproc_tools.fails("list_vms", vm_dir="not/absolute"))["message"]
    outside = await inproc_tools.fails("list_vms", vm_dir="/etc")
    assert "outside the directories this server allows" in outside["message"]


async def test_qemu_missing(workdir: Path, server: ServerProcess, vm_name: str) -> None:
    """A host without qemu-system-*: the spec's 'qemu-system-xxx: command not found'."""
    bin_dir = workdir / "bin-without-qemu"
    bin_dir.mkdir(exist_ok=True)
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        for entry in Path(directory).iterdir():
            target = bin_dir / entry.name
            if not entry.name.startswith("qemu-system-") and not target.exists():
                target.symlink_to(entry)
    with ServerProcess(
        vm_dir=server.vm_dir,
        env={"PATH": str(bin_dir), "QEMU_MCP_ACCEL": "tcg", "QEMU_MCP_ALLOWED_ROOTS": str(workdir)},
        reap_under=server.vm_dir / vm_name,  # the vm_dir is the session server's: only this test's VM
    ) as srv:
        async with open_tools(srv.url) as t:
            await t.ok("manage_vm", name=vm_name, action="create", arch="x86_64", memory="128M")
            answer = await t.fails("manage_vm", name=vm_name, action="start")
            assert "qemu-system-x86_64: command not found" in answer["message"]
            assert (await t.ok("list_vms", filter_name=vm_name))["data"]["vms"][0]["status"] == "stopped"
            await t.ok("manage_vm", name=vm_name, action="delete")
