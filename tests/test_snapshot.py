"""vm_snapshot with real guests: a stopped VM's disk (qemu-img), a running VM with its memory (QMP jobs), the
Debian cloud guest through vm_guest, a VM on the test sshd (with modify and delete), and bad input in-process.

The busybox guest writes random 1 MiB blocks over the first 64 MiB of its disk all the time, so the markers
of these tests live at 100 MiB and beyond, on a 128 MiB disk.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .buildcache import link_or_copy
from .debian import DebianPair, guest_call
from .guest_image import READY_MARKER, GuestISOs
from .inprocess import InProcess
from .sshd import SSHServer
from .support import ServerProcess, ToolClient, open_tools

QUICK = 1.0
BOOT = 120.0
MARKER_MIB = 100


async def console_end(tools: ToolClient, name: str, **where: Any) -> int:
    """The console log's current end: waits from here see only what comes next."""
    read = await tools.ok("vm_console", **where, name=name, action="read", lines=1)
    end: int = read["data"]["next_offset"]
    return end


async def boot(tools: ToolClient, name: str, **where: Any) -> str:
    """Start the VM and wait for its serial shell; returns the guest's name of its disk (vda)."""
    offset = await console_end(tools, name, **where)
    await tools.ok("manage_vm", **where, name=name, action="start")
    disk = await tools.ok(
        "vm_console", **where, name=name, action="wait", pattern=r"guest: disk: (\w+)", offset=offset, timeout=BOOT
    )
    ready = await tools.ok("vm_console", **where, name=name, action="wait", pattern=READY_MARKER, offset=offset)
    await tools.ok("vm_console", **where, name=name, action="wait", pattern="guest# $", offset=ready["data"]["offset"])
    device: str = disk["data"]["groups"][0]
    return device


async def shell(tools: ToolClient, name: str, command: str, pattern: str, **where: Any) -> dict[str, Any]:
    """Run ``command`` in the serial shell; the wait for ``pattern`` starts before it was sent."""
    offset = await console_end(tools, name, **where)
    await tools.ok("vm_console", **where, name=name, action="send", text=command + "\n")
    found = await tools.ok("vm_console", **where, name=name, action="wait", pattern=pattern, offset=offset, timeout=60)
    data: dict[str, Any] = found["data"]
    return data


async def write_marker(tools: ToolClient, name: str, device: str, text: str, mib: int, **where: Any) -> None:
    command = f"printf {text} | dd of=/dev/{device} bs=1M seek={mib} conv=fsync 2>/dev/null; echo WROTE-$((1+{mib}))"
    await shell(tools, name, command, rf"^WROTE-{mib + 1}\s*$", **where)


def disk_bytes(disk: Path, mib: int, length: int = 16) -> bytes:
    """``length`` bytes at ``mib`` MiB of the qcow2 disk as the guest sees it (converted, its format named)."""
    with tempfile.TemporaryDirectory(prefix="qmh-peek-") as scratch:
        out = Path(scratch) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(out)], check=True)
        with open(out, "rb") as f:
            f.seek(mib << 20)
            return f.read(length)


async def test_stopped_vm_goes_back_to_its_disk(tools: ToolClient, server: ServerProcess, guest_isos: GuestISOs,
                                                vm_name: str) -> None:  # fmt: skip
    """The guest writes a marker; snapshot while stopped; a second marker; revert: only the first is there."""
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="x86_64", memory="256M", vcpus=1, disk="size=128M",
        iso=str(guest_isos.amd64),
    )  # fmt: skip
    listed = await tools.ok("list_vms", filter_name=vm_name)
    disk = Path(listed["data"]["vms"][0]["disk"]["path"])
    assert disk.parent == server.vm_dir / vm_name
    device = await boot(tools, vm_name)
    await write_marker(tools, vm_name, device, "MARKER-ONE", MARKER_MIB)
    await tools.ok("manage_vm", name=vm_name, action="stop")
    made = await tools.ok("vm_snapshot", name=vm_name, action="create", snapshot="before")
    assert made["data"]["memory"] is False
    assert made["data"]["made_by"] == "qemu-img snapshot"
    listed = await tools.ok("vm_snapshot", name=vm_name, action="list")
    (only,) = listed["data"]["snapshots"]
    assert only["name"] == "before" and only["memory_bytes"] == 0 and only["date"].endswith("Z")

    await boot(tools, vm_name)
    await write_marker(tools, vm_name, device, "MARKER-TWO", MARKER_MIB + 1)
    await tools.ok("manage_vm", name=vm_name, action="stop")
    assert disk_bytes(disk, MARKER_MIB + 1).startswith(b"MARKER-TWO")  # the test can see a marker

    back = await tools.ok("vm_snapshot", name=vm_name, action="revert", snapshot="before")
    assert back["data"]["reverted_by"] == "qemu-img snapshot -a"
    assert disk_bytes(disk, MARKER_MIB).startswith(b"MARKER-ONE")
    assert disk_bytes(disk, MARKER_MIB + 1) == bytes(16)
    # And the guest sees it so, too.
    await boot(tools, vm_name)
    seen = await shell(
        tools, vm_name, f"dd if=/dev/{device} bs=1M skip={MARKER_MIB} count=2 2>/dev/null | tr -cd 'A-Z-' | "
        "sed 's/^/SEEN:/'; echo", r"^SEEN:(\S*)\s*$",
    )  # fmt: skip
    assert seen["groups"] == ["MARKER-ONE"]
    await tools.ok("vm_snapshot", name=vm_name, action="delete", snapshot="before")  # running: a QMP job
    assert (await tools.ok("vm_snapshot", name=vm_name, action="list"))["data"]["snapshots"] == []
    await tools.ok("manage_vm", name=vm_name, action="delete", stop_timeout=QUICK)


async def test_running_vm_goes_back_to_its_memory(tools: ToolClient, guest_isos: GuestISOs, vm_name: str) -> None:
    """Snapshot with memory; a counter moves on and a tmpfs file appears; revert: the counter continues from
    the saved value and the file is gone. A disk-only snapshot of the running VM cannot be gone back to."""
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="x86_64", memory="256M", vcpus=1, disk="size=128M",
        iso=str(guest_isos.amd64),
    )  # fmt: skip
    await boot(tools, vm_name)
    counting = r"COUNT-(\d+)\s*$"
    await shell(tools, vm_name, '(c=0; while :; do c=$((c+1)); echo "COUNT-$c"; sleep 1; done) &', counting)

    messages: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message)

    result = await tools.client.call_tool(
        "vm_snapshot", {"name": vm_name, "action": "create", "snapshot": "live"}, progress_callback=on_progress
    )
    details = result.structured_content
    assert details is not None and details["success"], result
    details = details["data"]
    assert any(m and "snapshot-save" in m for m in messages), messages  # the job's progress, streamed
    assert details["memory"] is True and details["made_by"].startswith("QMP snapshot-save")
    assert details["saved"]["memory_bytes"] > 0
    after_save = await tools.ok("vm_console", name=vm_name, action="wait", pattern=counting,
                                offset=await console_end(tools, vm_name), timeout=30)  # fmt: skip
    saved_count = int(after_save["data"]["groups"][0])

    await shell(tools, vm_name, "echo x >/run/after-snap; echo MADE-$((40+2))", r"^MADE-42\s*$")
    late = await tools.ok("vm_console", name=vm_name, action="wait", pattern=rf"COUNT-({saved_count + 5})\s*$",
                          offset=await console_end(tools, vm_name), timeout=60)  # fmt: skip
    assert late["success"]

    back = await tools.ok("vm_snapshot", name=vm_name, action="revert", snapshot="live")
    assert back["data"]["running"] is True
    assert back["data"]["reverted_by"].startswith("QMP snapshot-load")
    resumed = await tools.ok("vm_console", name=vm_name, action="wait", pattern=counting,
                             offset=await console_end(tools, vm_name), timeout=30)  # fmt: skip
    count = int(resumed["data"]["groups"][0])
    assert count <= saved_count + 1, (saved_count, count)  # back from saved_count + 5 and more
    gone = await shell(
        tools, vm_name, "echo FILE-$(test -e /run/after-snap && echo THERE || echo GONE)", r"FILE-(THERE|GONE)\s*$"
    )
    assert gone["groups"] == ["GONE"]

    disk_only = await tools.ok("vm_snapshot", name=vm_name, action="create", snapshot="disk-only", memory=False)
    assert disk_only["data"]["made_by"].startswith("QMP blockdev-snapshot-internal-sync")
    refused = await tools.fails("vm_snapshot", name=vm_name, action="revert", snapshot="disk-only")
    assert "stop the VM first" in refused["message"]
    names = [s["name"] for s in (await tools.ok("vm_snapshot", name=vm_name, action="list"))["data"]["snapshots"]]
    assert names == ["live", "disk-only"]
    for tag in names:
        await tools.ok("vm_snapshot", name=vm_name, action="delete", snapshot=tag)
    await tools.ok("manage_vm", name=vm_name, action="delete", stop_timeout=QUICK)


async def test_debian_file_comes_back(debian_pair: DebianPair) -> None:
    """The cloud guest: a file, a snapshot with memory, rm through vm_guest, revert: the file is back."""
    guest = debian_pair.local
    async with open_tools(guest.url) as tools:

        async def run(*command: str) -> dict[str, Any]:
            done = await guest_call(tools, guest, "vm_guest", action="exec", command=list(command))
            assert done["success"], done
            data: dict[str, Any] = done["data"]
            return data

        written = await guest_call(
            tools, guest, "vm_guest", action="write_file", path="/var/tmp/keep.txt", content="kept\n"
        )
        assert written["success"], written
        await run("sync")
        made = await guest_call(tools, guest, "vm_snapshot", action="create", snapshot="with-file")
        assert made["success"] and made["data"]["memory"] is True, made
        try:
            await run("rm", "/var/tmp/keep.txt")
            assert (await run("test", "-e", "/var/tmp/keep.txt"))["exit_code"] == 1
            back = await guest_call(tools, guest, "vm_snapshot", action="revert", snapshot="with-file")
            assert back["success"], back
            again = await run("cat", "/var/tmp/keep.txt")
            assert again["exit_code"] == 0 and again["stdout"] == "kept\n"
        finally:
            await guest_call(tools, guest, "vm_snapshot", action="delete", snapshot="with-file")


async def test_snapshots_through_ssh(remote_server: ServerProcess, sshd: SSHServer, guest_isos: GuestISOs) -> None:
    """On the test sshd: stopped snapshots, modify growing a disk that has some (and a revert that brings the
    old size back), a running VM's memory snapshot, and delete saying the snapshots went with the disk."""
    iso = link_or_copy(guest_isos.amd64, sshd.root / "iso" / "guest-amd64.iso")
    os.chmod(iso.parent, 0o755)
    os.chmod(iso, 0o644)
    where = {"host": "lab", "vm_dir": str(sshd.vm_dir)}
    async with open_tools(remote_server.url) as tools:
        await tools.ok(
            "manage_vm", **where, name="rsnap", action="create", arch="x86_64", memory="256M", vcpus=1,
            disk="size=128M", iso=str(iso),
        )  # fmt: skip
        try:
            await tools.ok("vm_snapshot", **where, name="rsnap", action="create", snapshot="empty")
            duplicate = await tools.fails("vm_snapshot", **where, name="rsnap", action="create", snapshot="empty")
            assert "already has a snapshot 'empty'" in duplicate["message"]
            grown = await tools.ok("manage_vm", **where, name="rsnap", action="modify", disk="size=192M")
            assert "snapshot" in grown["data"]["details"]["note"]
            back = await tools.ok("vm_snapshot", **where, name="rsnap", action="revert", snapshot="empty")
            assert "128M" in back["data"]["note"]
            listed = await tools.ok("list_vms", **where, filter_name="rsnap")
            assert listed["data"]["vms"][0]["disk"]["size"] == "128M", listed

            device = await boot(tools, "rsnap", **where)
            await write_marker(tools, "rsnap", device, "REMOTE", MARKER_MIB, **where)
            hot = await tools.ok("vm_snapshot", **where, name="rsnap", action="create")
            tag = hot["data"]["snapshot"]
            assert tag.startswith("snap-") and hot["data"]["memory"] is True
            await tools.ok("vm_snapshot", **where, name="rsnap", action="revert", snapshot=tag)
            await shell(tools, "rsnap", "echo ALIVE-$((1+1))", r"^ALIVE-2\s*$", **where)
            gone = await tools.ok("manage_vm", **where, name="rsnap", action="delete", stop_timeout=QUICK)
            assert "2 internal snapshot(s) (empty, " in gone["data"]["details"]["note"], gone
            assert not (sshd.vm_dir / "rsnap").exists()
        finally:
            await tools.call("manage_vm", **where, name="rsnap", action="delete", stop_timeout=QUICK)


async def test_bad_snapshot_input(inproc: InProcess) -> None:
    async with inproc.tools() as tools:
        await tools.ok("manage_vm", name="snappy", action="create", arch="x86_64", memory="64M", disk="size=16M")
        await tools.ok("vm_snapshot", name="snappy", action="create", snapshot="first")
        for args, words in (
            ({"action": "create", "snapshot": "first"}, "already has a snapshot 'first'"),
            ({"action": "create", "snapshot": "../x"}, "is not allowed"),
            ({"action": "create", "snapshot": "a b"}, "is not allowed"),
            ({"action": "create", "snapshot": "-d"}, "is not allowed"),
            ({"action": "create", "snapshot": "x" * 64}, "is not allowed"),
            ({"action": "create", "snapshot": ""}, "is not allowed"),
            ({"action": "create", "memory": True}, "no memory to save"),
            ({"action": "revert", "snapshot": "nope"}, "has no snapshot 'nope' (it has: first)"),
            ({"action": "delete", "snapshot": "nope"}, "has no snapshot 'nope'"),
            ({"action": "revert"}, "needs the snapshot's name"),
            ({"action": "delete"}, "needs the snapshot's name"),
            ({"action": "rename", "snapshot": "first"}, "action"),
        ):
            answer = await tools.fails("vm_snapshot", name="snappy", **args)
            assert words in answer["message"], (args, answer)
        missing = await tools.fails("vm_snapshot", name="ghost", action="list")
        assert "ghost" in missing["message"]

        await tools.ok("manage_vm", name="flat", action="create", arch="x86_64", memory="64M",
                       disk="size=16M,format=raw")  # fmt: skip
        raw = await tools.fails("vm_snapshot", name="flat", action="create")
        assert "raw disk" in raw["message"]

        attached = inproc.root / "theirs.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(attached), "16M"], check=True)
        await tools.ok("manage_vm", name="borrow", action="create", arch="x86_64", memory="64M",
                       disk=f"path={attached}")  # fmt: skip
        theirs = await tools.fails("vm_snapshot", name="borrow", action="create", snapshot="mine")
        assert "was attached" in theirs["message"]
        info = subprocess.run(["qemu-img", "info", "-f", "qcow2", str(attached)], capture_output=True, text=True)
        assert "Snapshot list" not in info.stdout  # nothing was done to it

        gone = await tools.ok("manage_vm", name="snappy", action="delete")
        assert "1 internal snapshot(s) (first) went with it" in gone["data"]["details"]["note"]
        for name in ("flat", "borrow"):
            await tools.ok("manage_vm", name=name, action="delete")
        assert attached.exists()
