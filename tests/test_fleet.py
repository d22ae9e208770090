"""A fleet of hosts and of servers, for real: list_vms over every host (``*``) and over a group (``@labs``)
with an unreachable host and a host that never answers among them, VMs created in another vm_dir found again
by name (the host's index), and the per-VM lock on an SSH host holding across two server processes (a race on
start; a lock held by another process there).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .buildcache import link_or_copy
from .guest_image import READY_MARKER, GuestISOs
from .sshd import SSHServer
from .support import ServerProcess, ToolClient, open_tools

QUICK = 1.0


@pytest.fixture(scope="module")
def fleet(workdir: Path, sshd: SSHServer) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers with the same hosts file: ``lab`` and ``lab2`` (the test sshd, two vm_dirs), ``dead`` (a
    port where nothing listens), ``mute`` (a port that accepts connections and never says a word), groups
    ``labs`` and ``mixed``; the local vm_dirs are their own."""
    root = workdir / "fleet"
    root.mkdir()
    lab2 = sshd.root / "vms2"
    lab2.mkdir(exist_ok=True)
    shutil.chown(lab2, sshd.user, sshd.user)
    # The kernel completes TCP handshakes into the backlog of a listening socket nobody reads: a host that
    # connects and then never sends its SSH banner.
    mute = socket.create_server(("127.0.0.1", 0))
    entry = {"address": sshd.address, "port": sshd.port, "user": sshd.user, "key": str(sshd.key)}
    hosts = {
        "lab": {**entry, "vm_dir": str(sshd.vm_dir)},
        "lab2": {**entry, "vm_dir": str(lab2)},
        "dead": {**entry, "port": sshd.unused_port()},
        "mute": {**entry, "address": "127.0.0.1", "port": mute.getsockname()[1]},
        "groups": {"labs": ["lab", "lab2"], "mixed": ["localhost", "lab", "dead"]},
    }
    (root / "hosts.json").write_text(json.dumps(hosts))
    servers = []
    for name in ("a", "b"):
        (root / name / "vms").mkdir(parents=True)
        servers.append(
            ServerProcess(
                vm_dir=root / name / "vms",
                reap_under=root,
                env={
                    "QEMU_MCP_ACCEL": "tcg",
                    "QEMU_MCP_ALLOWED_ROOTS": f"{workdir},{sshd.root}",
                    "QEMU_MCP_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
                    "QEMU_MCP_SSH_KEY_DIRS": str(sshd.key_dir),
                    "QEMU_MCP_SSH_HOSTS_FILE": str(root / "hosts.json"),
                    "QEMU_MCP_SSH_CONNECT_TIMEOUT": "2",
                    "QEMU_MCP_LOCK_TIMEOUT": "3",
                },
            )
        )
    with mute, servers[0] as a, servers[1] as b:
        yield a, b
    for leftover in ("fleet-a", "fleet-b", "race"):
        shutil.rmtree(sshd.vm_dir / leftover, ignore_errors=True)


async def list_with_progress(tools: ToolClient, **arguments: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        events.append({"progress": progress, "total": total, **json.loads(message or "{}")})

    result = await tools.client.call_tool("list_vms", arguments, progress_callback=on_progress)
    assert result.structured_content is not None
    return dict(result.structured_content), events


async def test_every_host_and_groups(fleet: tuple[ServerProcess, ServerProcess], sshd: SSHServer) -> None:
    server, _ = fleet
    async with open_tools(server.url) as tools:
        tiny = {"action": "create", "arch": "x86_64", "memory": "64M", "disk": "size=16M"}
        await tools.ok("manage_vm", name="fleet-a", **tiny)
        await tools.ok("manage_vm", host="lab", name="fleet-b", **tiny)
        try:
            # Other tests' VMs may live on the same hosts (the session's Debian guest on the sshd): filter.
            single = await tools.ok("list_vms", filter_name="fleet-")
            assert "hosts" not in single["data"] and [v["name"] for v in single["data"]["vms"]] == ["fleet-a"]
            assert "host" not in single["data"]["vms"][0]  # the spec's single-host shape, unchanged

            began = time.monotonic()
            everything, events = await list_with_progress(tools, host="*", filter_name="fleet-")
            took = time.monotonic() - began
            assert everything["success"], everything
            data = everything["data"]
            assert sorted((v["host"], v["name"]) for v in data["vms"]) == [("lab", "fleet-b"), ("localhost", "fleet-a")]
            by_host = {h["host"]: h for h in data["hosts"]}
            assert sorted(by_host) == ["dead", "lab", "lab2", "localhost", "mute"]
            for bad in ("dead", "mute"):
                assert by_host[bad]["success"] is False and bad in everything["message"], everything
                assert by_host[bad]["seconds"] < 2 + 3  # its connect timeout (2 s), not the sum of anything
            assert by_host["mute"]["seconds"] >= 1.5, by_host["mute"]  # it was waited for, up to that timeout
            assert by_host["lab"]["vm_count"] == 1 and by_host["lab2"]["vm_count"] == 0
            assert took < 10, took
            assert sorted(e["host"] for e in events) == sorted(by_host) and {e["total"] for e in events} == {5}
            assert sorted(e["progress"] for e in events) == [1, 2, 3, 4, 5]

            labs = await tools.ok("list_vms", host="@labs", filter_name="fleet-")
            assert [h["host"] for h in labs["data"]["hosts"]] == ["lab", "lab2"]
            assert [(v["host"], v["name"]) for v in labs["data"]["vms"]] == [("lab", "fleet-b")]
            stopped = await tools.ok("list_vms", host="@mixed", status="running", filter_name="fleet-")
            assert stopped["data"]["vms"] == [] and len(stopped["data"]["hosts"]) == 3

            for arguments, words in (
                ({"host": "@nope"}, "no group 'nope'; the groups are: @labs, @mixed"),
                ({"host": "*", "ssh_user": "root"}, "drop ssh_user/ssh_pwd/ssh_key"),
            ):
                refused = await tools.fails("list_vms", **arguments)
                assert words in refused["message"], refused
            for host in ("*", "@labs"):
                other = await tools.fails("manage_vm", host=host, name="fleet-a", action="start")
                assert "is for list_vms only" in other["message"], other
        finally:
            await tools.call("manage_vm", name="fleet-a", action="delete")
            await tools.call("manage_vm", host="lab", name="fleet-b", action="delete")


async def test_vms_in_other_vm_dirs_are_found_by_name(
    fleet: tuple[ServerProcess, ServerProcess], guest_isos: GuestISOs, sshd: SSHServer
) -> None:
    """create in another vm_dir; start, monitor, stop, modify, delete without vm_dir; list_vms shows it with its
    vm_dir; its name stays unique on the host; on an SSH host too."""
    server, _ = fleet
    elsewhere = server.vm_dir.parent / "data-vms"
    elsewhere.mkdir(exist_ok=True)
    remote_elsewhere = sshd.root / "remote-data"
    remote_elsewhere.mkdir(exist_ok=True)
    shutil.chown(remote_elsewhere, sshd.user, sshd.user)
    iso = link_or_copy(guest_isos.amd64, sshd.root / "iso" / "guest-amd64.iso")
    os.chmod(iso.parent, 0o755)
    os.chmod(iso, 0o644)
    async with open_tools(server.url) as tools:
        for where, directory, boot in (({}, elsewhere, guest_isos.amd64), ({"host": "lab"}, remote_elsewhere, iso)):
            made = await tools.ok(
                "manage_vm", **where, name="web", action="create", arch="x86_64", memory="256M", vcpus=1,
                disk="size=16M", iso=str(boot), vm_dir=str(directory),
            )  # fmt: skip
            assert made["data"]["details"]["vm_dir"] == str(directory)
            try:
                listed = await tools.ok("list_vms", **where, filter_name="web")  # the sshd may hold other VMs
                assert [(v["name"], v.get("vm_dir")) for v in listed["data"]["vms"]] == [("web", str(directory))]
                taken = await tools.fails("manage_vm", **where, name="web", action="create", arch="x86_64",
                                          memory="64M", disk="size=16M")  # fmt: skip
                assert f"VM web already exists in {directory}" in taken["message"], taken
                await tools.ok("manage_vm", **where, name="web", action="start")
                ready = await tools.ok("vm_console", **where, name="web", action="wait", pattern=READY_MARKER,
                                       offset=0, timeout=120)  # fmt: skip
                assert ready["data"]["match"] == READY_MARKER
                sample = await tools.ok("monitor_vm_status", **where, name="web", count=1)
                assert sample["data"]["vm_name"] == "web"
                await tools.ok("manage_vm", **where, name="web", action="stop", stop_timeout=QUICK)
                await tools.ok("manage_vm", **where, name="web", action="modify", memory="128M")
                await tools.ok("manage_vm", **where, name="web", action="delete")
                assert not (directory / "web").exists()
                assert (await tools.ok("list_vms", **where, filter_name="web"))["data"]["vms"] == []
            finally:
                await tools.call("manage_vm", **where, name="web", action="delete", vm_dir=str(directory))
    for default in (server.vm_dir, sshd.vm_dir):  # the index of each host: the entry came and went
        assert json.loads((default / ".index.json").read_text()) == {"version": 1, "vms": {}}


async def test_remote_lock_holds_across_servers(fleet: tuple[ServerProcess, ServerProcess], sshd: SSHServer,
                                                guest_isos: GuestISOs) -> None:  # fmt: skip
    """Two servers start the same remote VM at once: one starts it, the other waits for the lock and finds it
    running (never two QEMUs on one disk). A lock held by another process on the host makes a call fail with
    the lock-timeout message and change nothing."""
    a, b = fleet
    iso = link_or_copy(guest_isos.amd64, sshd.root / "iso" / "guest-amd64.iso")
    async with open_tools(a.url) as one, open_tools(b.url) as two:
        await one.ok("manage_vm", host="lab", name="race", action="create", arch="x86_64", memory="128M", vcpus=1,
                     disk="size=16M", iso=str(iso))  # fmt: skip
        try:
            for _ in range(3):
                first, second = await asyncio.gather(
                    one.call("manage_vm", host="lab", name="race", action="start"),
                    two.call("manage_vm", host="lab", name="race", action="start"),
                )
                assert first["success"] and second["success"], (first, second)
                messages = sorted([first["message"], second["message"]])
                assert sum("already running" in m for m in messages) == 1, messages
                pids = subprocess.run(["pgrep", "-f", f"{sshd.vm_dir}/race/"], capture_output=True, text=True)
                assert len(pids.stdout.split()) == 1, pids.stdout
                stops = await asyncio.gather(
                    one.call("manage_vm", host="lab", name="race", action="stop", stop_timeout=QUICK),
                    two.call("manage_vm", host="lab", name="race", action="stop", stop_timeout=QUICK),
                )
                assert all(s["success"] for s in stops), stops

            holder = await asyncio.create_subprocess_exec(
                "ssh", "-i", str(sshd.key), "-p", str(sshd.port), "-o", f"UserKnownHostsFile={sshd.known_hosts}",
                "-o", "BatchMode=yes", f"{sshd.user}@{sshd.address}",
                # One string: the remote shell parses it.
                f"flock {sshd.vm_dir}/.locks/race.lock sh -c 'echo held; sleep 8'",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert holder.stdout is not None
                assert (await asyncio.wait_for(holder.stdout.readline(), 20)).strip() == b"held"
                blocked = await one.fails("manage_vm", host="lab", name="race", action="start")
                assert "held the lock" in blocked["message"] and "race.lock" in blocked["message"], blocked
                state = await one.ok("list_vms", host="lab", filter_name="race")
                assert state["data"]["vms"][0]["status"] == "stopped"
            finally:
                holder.kill()
                await holder.wait()
            for _ in range(5):  # the remote sleep outlives its ssh client: free again once it ends
                again = await one.call("manage_vm", host="lab", name="race", action="start")
                if again["success"]:
                    break
                assert "held the lock" in again["message"], again
            assert again["success"], again
        finally:
            await one.call("manage_vm", host="lab", name="race", action="delete", stop_timeout=QUICK)
