"""Attacks through ordinary tool calls (and through files a guest controls) that once worked; each stays closed.

The server runs as root with default settings but for its roots: ``allowed_roots`` is this module's ``root``;
``outside`` is a directory beside it that no call may reach. Files an attacking guest could have written into
its own raw disk (a qcow2 header naming a backing or data file) are made here with ``qemu-img``: the bytes are
the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from mcp.shared.exceptions import MCPError

from .inprocess import InProcess
from .support import (
    ServerProcess,
    ToolClient,
    kill_groups,
    open_tools,
    pid_of,
    pids_running,
    slow_command_path,
    wait_for,
)

QUICK = 1.0  # no guest answers ACPI here: stop falls through to QMP quit after this


@dataclass
class Env:
    server: ServerProcess
    root: Path
    outside: Path
    audit: Path

    @property
    def vm_dir(self) -> Path:
        return self.server.vm_dir


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="qmhh-", dir="/tmp"))
    outside = Path(tempfile.mkdtemp(prefix="qmho-", dir="/tmp"))
    (outside / "secret.txt").write_text("outside secret\n")
    audit = root / "audit.log"
    (root / "vms").mkdir()
    try:
        with ServerProcess(
            vm_dir=root / "vms",
            reap_under=root,
            env={
                "QEMU_MCP_ACCEL": "tcg",
                "QEMU_MCP_ALLOWED_ROOTS": str(root),
                "QEMU_MCP_LOCK_TIMEOUT": "3",
                "QEMU_MCP_QMP_TIMEOUT": "1",
                "QEMU_MCP_AUDIT_LOG": str(audit),
            },
        ) as server:
            yield Env(server, root, outside, audit)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(outside, ignore_errors=True)


@pytest.fixture
async def t(env: Env) -> Any:
    async with open_tools(env.server.url) as client:
        yield client


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def open_files(pid: int) -> set[str]:
    """What a process has open, from /proc (the truth about what QEMU opened)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


def create_args(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "action": "create", "arch": "x86_64", "memory": "128M", "vcpus": 1, **extra}


# -- 1. image formats ------------------------------------------------------------------------------


async def test_existing_disk_naming_an_outside_backing_file_is_refused(t: ToolClient, env: Env) -> None:
    """A raw disk a guest rewrote with a qcow2 header whose backing file is outside the roots: not attached."""
    planted = env.root / "g1data.img"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(env.outside / "secret.txt"), "-F", "raw", str(planted), "1M")
    refused = await t.fails("manage_vm", **create_args("g2", disk=f"path={planted}"))
    assert refused["data"]["error"] == "InvalidInput" and "outside" in refused["message"], refused
    assert not (env.vm_dir / "g2").exists()
    # The same file as an ISO is attached as raw bytes: QEMU never opens the backing file.
    await t.ok("manage_vm", **create_args("g3", iso=str(planted), disk="size=16M"))
    await t.ok("manage_vm", name="g3", action="start")
    try:
        pid = pid_of(env.vm_dir, "g3")
        assert str(planted) in open_files(pid)
        assert str(env.outside / "secret.txt") not in open_files(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert any(a.startswith(f"file={planted},".encode()) and a.endswith(b",format=raw") for a in cmdline)
    finally:
        await t.ok("manage_vm", name="g3", action="delete", stop_timeout=QUICK)


@pytest.mark.parametrize("kind", ["data_file", "json", "nbd", "unrecorded_format", "vmdk"])
async def test_other_ways_through_an_image_header_are_refused(t: ToolClient, env: Env, kind: str) -> None:
    """External data files, json:/protocol backing names, a backing file QEMU would have to probe, other formats."""
    planted = env.root / f"planted-{kind}.img"
    victim = env.outside / f"victim-{kind}.raw"
    victim.write_bytes(b"\0" * 4096)
    if kind == "data_file":
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={victim},data_file_raw=on", str(planted), "1M")
    elif kind == "json":
        spec = json.dumps({"driver": "file", "filename": str(victim)})
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"json:{spec}", "-F", "raw", str(planted), "1M")
    elif kind == "nbd":
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nbd:127.0.0.1:10809", "-F", "raw", str(planted), "1M")
    elif kind == "unrecorded_format":
        inside = env.root / "inside-base.raw"
        inside.write_bytes(b"\0" * 65536)
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(inside), "-F", "raw", str(planted), "1M")
        # Images made by older tools record no backing format: turn the header extension that holds it
        # (magic 0xE2792ACA) into an unknown one, which QEMU ignores.
        header = planted.read_bytes()
        assert header.count(b"\xe2\x79\x2a\xca") == 1
        planted.write_bytes(header.replace(b"\xe2\x79\x2a\xca", b"nope"))
    else:
        qemu_img("create", "-q", "-f", "vmdk", str(planted), "1M")
    before = victim.read_bytes()
    refused = await t.fails("manage_vm", **create_args(f"h-{kind}".replace("_", "-"), disk=f"path={planted}"))
    assert refused["data"]["error"] == "InvalidInput", refused
    expected = {
        "data_file": "outside",
        "json": "not a plain path",
        "nbd": "not a plain path",
        "unrecorded_format": "does not record the format of its backing file",
        "vmdk": "only qcow2 and raw",
    }[kind]
    assert expected in refused["message"], refused
    assert victim.read_bytes() == before


async def test_a_safe_overlay_inside_the_roots_is_attached(t: ToolClient, env: Env) -> None:
    """The fence is not a ban on overlays: a chain inside the roots with recorded formats works."""
    base = env.root / "base.qcow2"
    overlay = env.root / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "32M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay), "32M")
    created = await t.ok("manage_vm", **create_args("overlaid", disk=f"path={overlay}"))
    assert created["data"]["details"]["disk"]["format"] == "qcow2"
    await t.ok("manage_vm", name="overlaid", action="start")
    await t.ok("manage_vm", name="overlaid", action="delete", stop_timeout=QUICK)
    assert overlay.exists() and base.exists()  # attached, so kept


async def test_start_checks_the_disk_again(t: ToolClient, env: Env) -> None:
    """A disk that was fine at create and names an outside backing file later does not start."""
    await t.ok("manage_vm", **create_args("rechecked", disk="size=16M"))
    disk = env.vm_dir / "rechecked" / "rechecked.qcow2"
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", str(env.outside / "secret.txt"), "-F", "raw", str(disk))
    refused = await t.fails("manage_vm", name="rechecked", action="start")
    assert "outside" in refused["message"], refused
    assert not (env.vm_dir / "rechecked" / "qemu.pid").exists()
    await t.ok("manage_vm", name="rechecked", action="delete")


# -- 2. and 3. files of other VMs, and files the server manages -------------------------------------


async def test_files_of_vms_are_never_disks_isos_or_vm_dirs(t: ToolClient, env: Env) -> None:
    await t.ok("manage_vm", **create_args("h1", disk="size=16M"))
    h1 = env.vm_dir / "h1"
    cases = [
        ({"disk": f"path={h1}/vm.json"}, "disk"),  # a managed file
        ({"disk": f"path={h1}/x1disk.qcow2,size=16M"}, "disk"),  # a new disk inside another VM's directory
        ({"disk": f"path={h1}/qemu.pid,size=16M"}, "disk"),  # named like a runtime file
        ({"disk": f"path={h1}/h1.qcow2"}, "disk"),  # another VM's disk
        ({"disk": f"path={env.vm_dir}/.locks/h1.lock"}, "disk"),
        ({"iso": f"{h1}/h1.qcow2"}, "iso"),
        ({"vm_dir": str(h1)}, "vm_dir"),  # a vm_dir inside a VM directory
        ({"vm_dir": f"{h1}/nested"}, "vm_dir"),
    ]
    for extra, field in cases:
        refused = await t.fails("manage_vm", **create_args("intruder", **extra))
        assert refused["data"]["error"] == "InvalidInput" and f"'{field}'" in refused["message"], (extra, refused)
    assert sorted(p.name for p in h1.iterdir()) == ["h1.qcow2", "vm.json"]
    assert not (env.vm_dir / "intruder").exists()
    await t.ok("manage_vm", name="h1", action="delete")


async def test_delete_never_trusts_the_paths_of_a_definition(t: ToolClient, env: Env) -> None:
    """A definition edited to name another file makes delete remove nothing but what create made.

    Outside the roots even the file's true identity does not help; inside them, the identity recorded for the
    disk create made is not the identity of the other file.
    """
    victim_out = env.outside / "victim.txt"
    victim_in = env.root / "victim-inside.txt"
    for name, victim in (("forged-out", victim_out), ("forged-in", victim_in)):
        victim.write_text("keep")
        await t.ok("manage_vm", **create_args(name, disk="size=16M"))
        definition_path = env.vm_dir / name / "vm.json"
        definition = json.loads(definition_path.read_text())
        if victim == victim_out:
            true_identity = subprocess.run(
                ["stat", "--printf", "%d:%i:%.9W:file", str(victim)], capture_output=True, text=True, check=True
            ).stdout
            definition["disk"]["identity"] = true_identity
        definition["disk"].update(path=str(victim), created_by_tool=True)
        definition_path.write_text(json.dumps(definition))
        deleted = await t.ok("manage_vm", name=name, action="delete")
        assert victim.read_text() == "keep", deleted
        assert str(victim) in deleted["data"]["details"]["kept"]
    # A definition naming a path QEMU would read as options is no definition at all.
    await t.ok("manage_vm", **create_args("comma", disk="size=16M"))
    definition_path = env.vm_dir / "comma" / "vm.json"
    definition = json.loads(definition_path.read_text())
    definition["mac"] = "52:54:00:00:00:01,romfile=/etc/shadow"
    definition_path.write_text(json.dumps(definition))
    refused = await t.fails("manage_vm", name="comma", action="start")
    assert "unreadable" in refused["message"], refused
    assert not (env.vm_dir / "comma" / "qemu.pid").exists()
    await t.ok("manage_vm", name="comma", action="delete")


async def test_nested_vm_dir_and_foreign_files_survive_a_delete(t: ToolClient, env: Env) -> None:
    """Whatever lies in a VM directory that the server did not make is kept by its delete."""
    await t.ok("manage_vm", **create_args("n1", disk="size=16M"))
    foreign = env.vm_dir / "n1" / "notes.txt"
    foreign.write_text("mine")
    deleted = await t.ok("manage_vm", name="n1", action="delete")
    details = deleted["data"]["details"]
    assert foreign.read_text() == "mine" and details["kept"] == [str(foreign)], details
    assert str(env.vm_dir / "n1" / "n1.qcow2") in details["removed"]
    assert str(env.vm_dir / "n1") not in details["removed"]
    shutil.rmtree(env.vm_dir / "n1")


# -- 4. bounded work ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_huge_runtime_files_are_not_read(t: ToolClient, env: Env) -> None:
    await t.ok("manage_vm", **create_args("bloated", disk="size=16M"))
    pidfile = env.vm_dir / "bloated" / "qemu.pid"
    with open(pidfile, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB of NULs without a newline
    assert env.server.proc is not None
    before = rss_kib(env.server.proc.pid)
    began = time.monotonic()
    listed = await t.ok("list_vms", filter_name="bloated")
    assert time.monotonic() - began < 10  # reading it was 88 s and 6.4 GB
    assert listed["data"]["vms"][0]["status"] == "stopped"
    assert rss_kib(env.server.proc.pid) - before < 100_000
    await t.ok("manage_vm", name="bloated", action="delete")


async def test_non_finite_and_huge_numbers_are_refused(inproc_tools: ToolClient) -> None:
    t = inproc_tools  # answers of validation: the app in this process gives them as a server does
    for bad in ("nan", "inf", "-inf", 1e300):
        answer = await t.fails("manage_vm", name="nobody", action="stop", stop_timeout=bad)
        assert "stop_timeout" in answer["message"], (bad, answer)
        answer = await t.fails("monitor_vm_status", name="nobody", interval=bad, count=1)
        assert "interval" in answer["message"], (bad, answer)
    huge = "1" + "0" * 400
    for args in ({"memory": huge}, {"memory": huge + "G"}, {"disk": f"size={huge}"}, {"memory": "1e400"}):
        answer = await t.fails("manage_vm", **create_args("huge", **args))
        assert answer["data"]["error"] in ("InvalidInput", "LimitExceeded"), answer
        assert "internal error" not in answer["message"]
    answer = await t.fails("manage_vm", **create_args("huge", memory="99999999999999999999T"))
    assert answer["data"]["error"] == "LimitExceeded", answer


async def test_a_second_call_waits_at_most_the_lock_timeout(t: ToolClient, env: Env) -> None:
    """In-process too: a call on a VM that another call holds fails after --lock-timeout (3 s here)."""
    await t.ok("manage_vm", **create_args("busy", disk="size=16M"))
    await t.ok("manage_vm", name="busy", action="start")
    holder = asyncio.create_task(t.call("manage_vm", name="busy", action="stop", stop_timeout=8))
    await asyncio.sleep(0.5)
    began = time.monotonic()
    second = await t.fails("manage_vm", name="busy", action="start")
    assert 2.5 < time.monotonic() - began < 7, second
    assert "held its lock for more than 3 s" in second["message"], second
    assert (await holder)["success"]
    await t.ok("manage_vm", name="busy", action="delete")


async def test_unknown_names_leave_no_lock_file(inproc_tools: ToolClient, inproc: InProcess) -> None:
    t = inproc_tools
    for action in ("start", "stop", "delete", "modify"):
        answer = await t.fails("manage_vm", name="ghost", action=action, memory="256M")
        assert answer["data"]["error"] == "VMNotFound", answer
    refused = await t.fails("manage_vm", **create_args("ghost", iso=str(inproc.root / "missing.iso")))
    assert "iso" in refused["message"]
    assert not (inproc.vm_dir / ".locks" / "ghost.lock").exists()


async def test_metrics_series_stay_bounded(t: ToolClient, env: Env) -> None:
    for i in range(80):
        await t.ok("list_vms", vm_dir=str(env.root / f"nothing-here-{i}"))
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{env.server.port}/metrics")).text
    series = [line for line in text.splitlines() if line.startswith("qemu_mcp_vms{")]
    assert not any("nothing-here" in line for line in series), series[:3]


# -- 5. a failed change leaves things as they were ---------------------------------------------------


async def test_modify_that_cannot_be_applied_is_rolled_back(t: ToolClient, env: Env) -> None:
    await t.ok("manage_vm", **create_args("rollback", disk="size=16M"))
    await t.ok("manage_vm", name="rollback", action="start")
    failed = await t.fails("manage_vm", name="rollback", action="modify", memory="200G", stop_timeout=QUICK)
    assert "Cannot allocate memory" in failed["message"] and "restored" in failed["message"], failed
    assert failed["data"]["details"]["rolled_back"] is True
    assert json.loads((env.vm_dir / "rollback" / "vm.json").read_text())["memory_mib"] == 128
    vm = (await t.ok("list_vms", filter_name="rollback"))["data"]["vms"][0]
    assert (vm["status"], vm["memory"]) == ("running", "128M"), vm
    await t.ok("manage_vm", name="rollback", action="delete", stop_timeout=QUICK)


async def test_a_client_that_goes_away_leaves_a_finished_and_audited_change(env: Env) -> None:
    async with open_tools(env.server.url) as t:
        await t.ok("manage_vm", **create_args("abandoned", disk="size=16M"))
        await t.ok("manage_vm", name="abandoned", action="start")
        call = asyncio.create_task(t.call("manage_vm", name="abandoned", action="stop", stop_timeout=2))
        await asyncio.sleep(0.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    async def stopped() -> bool:
        return not (env.vm_dir / "abandoned" / "qemu.pid").exists()

    assert await wait_for(stopped, 15)

    def audited() -> list[dict[str, Any]]:
        lines = env.audit.read_text().splitlines() if env.audit.exists() else []
        return [r for r in map(json.loads, lines) if r["vm"] == "abandoned" and r["action"] == "stop"]

    async def logged() -> bool:
        return bool(audited())

    assert await wait_for(logged, 10)
    record = audited()[-1]
    assert record["success"] is True and record["client_gone"] is True, record
    async with open_tools(env.server.url) as t:
        await t.ok("manage_vm", name="abandoned", action="delete")


async def test_delete_cleans_what_an_interrupted_create_made(env: Env) -> None:
    """The server dies after create made a disk outside the VM directory; delete removes that disk and the rest."""
    vm_dir = env.root / "crash2"
    vm_dir.mkdir()
    outside_disk = env.root / "made-by-create.qcow2"
    # Copying the arm64 UEFI variables sleeps: the server can be killed after create made the disk.
    slow = slow_command_path(env.root / "slow-bin", "cp", when_args_match="*AAVMF*")
    roots = {"QEMU_MCP_ACCEL": "tcg", "QEMU_MCP_ALLOWED_ROOTS": str(env.root)}
    with ServerProcess(vm_dir=vm_dir, env={**roots, "PATH": slow}) as srv:
        try:
            async with open_tools(srv.url) as t:
                args = {**create_args("cut"), "arch": "arm64", "disk": f"path={outside_disk},size=16M"}
                create = asyncio.create_task(t.call("manage_vm", **args))

                async def disk_made() -> bool:
                    return outside_disk.exists()

                assert await wait_for(disk_made, 15)
                await asyncio.sleep(0.5)
                srv.stop(signal.SIGKILL)
                create.cancel()
                await asyncio.gather(create, return_exceptions=True)
        except* (httpx.HTTPError, MCPError):
            pass  # the session dies with the server: that is the point
        kill_groups(pids_running(f"{env.root}/slow-bin/cp"))  # the orphaned cp of the dead server, with its sleep
        with ServerProcess(vm_dir=vm_dir, env=roots) as srv:
            async with open_tools(srv.url) as t:
                assert (await t.ok("list_vms"))["data"]["incomplete"] == ["cut"]
                deleted = (await t.ok("manage_vm", name="cut", action="delete"))["data"]["details"]
                assert str(outside_disk) in deleted["removed"] and str(vm_dir / "cut") in deleted["removed"], deleted
                assert not outside_disk.exists() and not (vm_dir / "cut").exists()


async def test_a_vm_directory_replaced_by_a_link_is_never_followed(t: ToolClient, env: Env) -> None:
    await t.ok("manage_vm", **create_args("linked", disk="size=16M"))
    target = env.root / "link-target"
    shutil.move(env.vm_dir / "linked", target)
    (target / "qemu.pid").write_text("1\n")
    (target / "runtime.json").write_text("{}")
    (env.vm_dir / "linked").symlink_to(target)
    refused = await t.fails("manage_vm", name="linked", action="start")
    assert "symbolic link" in refused["message"]
    deleted = (await t.ok("manage_vm", name="linked", action="delete"))["data"]["details"]
    assert deleted["removed"] == [str(env.vm_dir / "linked")] and not (env.vm_dir / "linked").exists()
    assert sorted(p.name for p in target.iterdir()) == ["linked.qcow2", "qemu.pid", "runtime.json", "vm.json"]
    shutil.rmtree(target)


# -- 7. small things ---------------------------------------------------------------------------------


async def test_unknown_tools_and_arguments_get_the_envelope(inproc_tools: ToolClient, inproc: InProcess) -> None:
    t = inproc_tools
    answer = await t.fails("nosuchtool", name="x")
    assert "Unknown tool 'nosuchtool'" in answer["message"] and "manage_vm" in answer["message"]
    misspelled = await t.fails("manage_vm", **create_args("typo"), memroy="8G")
    assert "'memroy'" in misspelled["message"] and "memory" in misspelled["message"], misspelled
    assert not (inproc.vm_dir / "typo").exists()
    tools = (await t.client.list_tools()).tools
    assert all(tool.input_schema.get("additionalProperties") is False for tool in tools)


async def test_singular_sample_and_a_stopped_vm_logged_once(t: ToolClient, env: Env) -> None:
    await t.ok("manage_vm", **create_args("frozen", disk="size=16M"))
    await t.ok("manage_vm", name="frozen", action="start")
    pid = pid_of(env.vm_dir, "frozen")

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if progress == 1:
            os.kill(pid, signal.SIGKILL)

    result = await t.client.call_tool(
        "monitor_vm_status",
        {"name": "frozen", "metrics": "cpu", "interval": 1, "count": 5},
        progress_callback=on_progress,
    )
    envelope = result.structured_content
    assert envelope is not None and not envelope["success"]
    if len(envelope["data"]["metrics_data"]) == 1:
        assert "(after 1 sample)" in envelope["message"], envelope["message"]
    await t.ok("manage_vm", name="frozen", action="start")
    pid = pid_of(env.vm_dir, "frozen")
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(2.5)  # past the QMP pool's idle time: each call must connect again
        for _ in range(3):
            await t.ok("list_vms", filter_name="frozen")
    finally:
        os.kill(pid, signal.SIGCONT)
    log = env.server.log_text()
    assert "Failed to receive Greeting" not in log
    warnings = [line for line in log.splitlines() if "WARNING" in line and "VM frozen" in line]
    assert len(warnings) == 1, warnings
    await t.ok("manage_vm", name="frozen", action="delete", stop_timeout=QUICK)
