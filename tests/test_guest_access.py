"""Into the guest: VMs from a cloud image with cloud-init and port forwards, wait-until-ready, vm_guest; for real.

A real Debian 12 guest on the local host and one on the test sshd (tests/debian.py), made and started by the
product through the real MCP client; a real ``ssh`` login with the key cloud-init installed; commands and files
through the real qemu-guest-agent. Bad input is checked in-process, on a server without QEMU work.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .debian import Debian, DebianPair, file_sha256, guest_call, ssh_argv
from .inprocess import InProcess
from .sshd import SSHServer
from .support import ServerProcess, ToolClient, open_tools

QUICK = 1.0


@pytest.fixture(params=["local", "remote"])
def guest(request: pytest.FixtureRequest, debian_pair: DebianPair) -> Debian:
    return debian_pair.local if request.param == "local" else debian_pair.remote


async def test_start_waited_for_ssh_and_says_how_to_log_in(debian_pair: DebianPair, sshd: SSHServer) -> None:
    """start wait='ssh' answered once SSH answered, with the login hint and the guest's facts from its agent."""
    for guest in (debian_pair.local, debian_pair.remote):
        details = guest.started["data"]["details"]
        assert details["waited_seconds"] > 0 and "SSH answers" in guest.started["message"]
        assert details["ssh"]["user"] == "ops" and details["ssh"]["host"] == "127.0.0.1"
        assert details["guest"]["os"].startswith("Debian GNU/Linux 12")
        addresses = [a for found in details["guest"]["interfaces"].values() for a in found]
        assert any(a.startswith("10.0.2.15/") for a in addresses), addresses
    assert debian_pair.local.ssh["command"] == f"ssh -p {debian_pair.local.ssh['port']} ops@127.0.0.1"
    remote = debian_pair.remote.ssh
    assert remote["on_host"] == sshd.address and f"-J {sshd.user}@{sshd.address}:{sshd.port}" in remote["command"]


def test_ssh_login_with_the_key_cloud_init_installed(debian_pair: DebianPair, sshd: SSHServer) -> None:
    """A real OpenSSH login as the cloud-init user, locally and through the remote host (as the hint says)."""
    local = subprocess.run(ssh_argv(debian_pair.local, "id -un; hostname"), capture_output=True, text=True, timeout=60)
    assert local.stdout.split() == ["ops", "deb"], local.stderr
    remote = subprocess.run(
        ssh_argv(debian_pair.remote, "id -un; hostname", jump=sshd), capture_output=True, text=True, timeout=60
    )
    assert remote.stdout.split() == ["ops", "rdeb"], remote.stderr


async def test_vm_guest_exec_files_and_info(guest: Debian) -> None:
    async with open_tools(guest.url) as tools:
        uname = await guest_call(tools, guest, "vm_guest", action="exec", command=["uname", "-s"])
        assert uname["success"] and uname["data"]["exit_code"] == 0 and uname["data"]["stdout"] == "Linux\n"
        piped = await guest_call(
            tools,
            guest,
            "vm_guest",
            action="exec",
            command='read line; echo "$line $GREETING"; echo oops >&2; exit 3',
            input="hello\n",
            env={"GREETING": "from the env"},
        )
        data = piped["data"]
        assert (data["exit_code"], data["stdout"], data["stderr"]) == (3, "hello from the env\n", "oops\n")
        written = await guest_call(
            tools, guest, "vm_guest", action="write_file", path="/tmp/qmh.txt", content="línea 1\n", mode="0600"
        )
        assert written["success"] and written["data"]["bytes_written"] == len("línea 1\n".encode())
        await guest_call(tools, guest, "vm_guest", action="write_file", path="/tmp/qmh.txt", content="2\n", append=True)
        read = await guest_call(tools, guest, "vm_guest", action="read_file", path="/tmp/qmh.txt")
        assert read["data"]["content"] == "línea 1\n2\n" and read["data"]["truncated"] is False
        mode = await guest_call(tools, guest, "vm_guest", action="exec", command=["stat", "-c", "%a", "/tmp/qmh.txt"])
        assert mode["data"]["stdout"].strip() == "600"
        cut = await guest_call(tools, guest, "vm_guest", action="read_file", path="/tmp/qmh.txt", max_bytes=3)
        assert cut["data"]["size"] == 3 and cut["data"]["truncated"] is True
        binary = await guest_call(tools, guest, "vm_guest", action="read_file", path="/bin/true", max_bytes=64)
        assert "content_base64" in binary["data"]
        info = (await guest_call(tools, guest, "vm_guest", action="info"))["data"]
        assert info["exec_enabled"] and info["hostname"] == guest.name and info["os"]["name"].startswith("Debian")
        assert any(fs["mountpoint"] == "/" for fs in info["filesystems"])
        slow = await guest_call(tools, guest, "vm_guest", action="exec", command=["sleep", "30"], timeout=1)
        assert not slow["success"] and "did not end within 1 s" in slow["message"]
        missing = await guest_call(tools, guest, "vm_guest", action="exec", command=["/no/such/program"])
        assert not missing["success"] and missing["data"]["error"] == "GuestAgentError", missing


async def test_list_vms_shows_ports_and_the_ssh_hint(debian_pair: DebianPair) -> None:
    guest = debian_pair.local
    async with open_tools(guest.url) as tools:
        vm = (await tools.ok("list_vms", filter_name="deb"))["data"]["vms"]
    entry = next(v for v in vm if v["name"] == "deb")
    assert entry["ports"] == [{"spec": "22", "host_port": guest.ssh["port"], "guest_port": 22, "proto": "tcp"}]
    assert entry["ssh"] == guest.ssh and entry["image"]["clone"] == "linked"
    assert entry["cloud_init"]["user"] == "ops" and entry["cloud_init"]["password_set"] is False
    assert "$6$" not in json.dumps(entry) and "password_hash" not in json.dumps(entry)


async def test_clones_leave_the_image_as_it_was(debian_pair: DebianPair, server: ServerProcess) -> None:
    """The guest of a linked clone ran and wrote; a full clone is a copy; the image's checksum never moved."""
    guest = debian_pair.local
    async with open_tools(guest.url) as tools:
        wrote = await guest_call(
            tools, guest, "vm_guest", action="exec", command="dd if=/dev/urandom of=/x bs=1M count=8; sync"
        )
        assert wrote["data"]["exit_code"] == 0
        full = await tools.ok(
            "manage_vm", name="full", action="create", arch="x86_64", image=str(guest.image), clone="full"
        )
        disk = Path(full["data"]["details"]["disk"]["path"])
        info = json.loads(
            subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True).stdout
        )
        assert "backing-filename" not in info and info["virtual-size"] == 2 << 30
        await tools.ok("manage_vm", name="full", action="delete")
    assert file_sha256(guest.image) == debian_pair.image_sha256


async def test_linked_clones_of_a_vm(tools: ToolClient, server: ServerProcess) -> None:
    """image='vm:<name>' clones a stopped VM's disk; the base then neither starts (it would corrupt its clones)
    nor goes away while they exist."""
    await tools.ok("manage_vm", name="base1", action="create", arch="x86_64", memory="64M", disk="size=32M")
    refused = await tools.fails("manage_vm", name="child1", action="create", arch="x86_64", image="vm:nope")
    assert "nope" in refused["message"]
    child = await tools.ok("manage_vm", name="child1", action="create", arch="x86_64", memory="64M", image="vm:base1")
    assert child["data"]["details"]["image"]["vm"] == "base1"
    start = await tools.fails("manage_vm", name="base1", action="start")
    assert "linked clones (child1)" in start["message"]
    delete = await tools.fails("manage_vm", name="base1", action="delete")
    assert "linked clones (child1)" in delete["message"] and (server.vm_dir / "base1" / "vm.json").exists()
    await tools.ok("manage_vm", name="child1", action="start")
    running = await tools.fails("manage_vm", name="child2", action="create", arch="x86_64", image="vm:child1")
    assert "running" in running["message"]
    await tools.ok("manage_vm", name="child1", action="delete", stop_timeout=QUICK)
    await tools.ok("manage_vm", name="base1", action="delete")


async def test_a_host_port_in_use_fails_the_start_naming_it(tools: ToolClient, server: ServerProcess) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        await tools.ok(
            "manage_vm",
            name="clash",
            action="create",
            arch="x86_64",
            memory="64M",
            disk="size=16M",
            ports=[f"{port}:22"],
        )
        refused = await tools.fails("manage_vm", name="clash", action="start")
        assert f"host port {port}/tcp is in use" in refused["message"]
        assert not (server.vm_dir / "clash" / "qemu.pid").exists()
    started = await tools.ok("manage_vm", name="clash", action="start")
    assert started["data"]["details"]["ports"][0]["host_port"] == port
    await tools.ok("manage_vm", name="clash", action="delete", stop_timeout=QUICK)


async def test_a_missing_bridge_is_a_clear_error(tools: ToolClient) -> None:
    await tools.ok(
        "manage_vm",
        name="bridged",
        action="create",
        arch="x86_64",
        memory="64M",
        disk="size=16M",
        network="bridge=qmhnone0",
    )
    refused = await tools.fails("manage_vm", name="bridged", action="start")
    assert "qmhnone0" in refused["message"] and "bridge" in refused["message"], refused
    await tools.ok("manage_vm", name="bridged", action="delete")


BAD_CREATES: list[tuple[dict[str, Any], str]] = [
    ({"image": "/etc/hostname"}, "outside"),
    ({"image": "{root}/missing.qcow2"}, "does not exist"),
    ({"image": "vm:bad name"}, "name"),
    ({"image": "{root}/img.qcow2", "clone": "copy"}, "clone"),
    ({"image": "{root}/img.qcow2", "disk": "size=1M"}, "may only grow"),
    ({"image": "{root}/img.qcow2", "disk": "format=raw"}, "linked clone is a qcow2"),
    ({"cloud_init": {"user": "ops", "ssh_authorized_keys": ["not a key"]}}, "ssh_authorized_keys"),
    ({"cloud_init": {"usr": "ops"}}, "usr"),
    ({"cloud_init": {"password": "secret-pw"}}, "user"),
    ({"cloud_init": {"user_data": "#cloud-config\n" + "x" * 70000}}, "user_data"),
    ({"cloud_init": {"user_data": "echo no header"}}, "user_data"),
    ({"cloud_init": "user: ops"}, "cloud_init"),
    ({"ports": ["abc"]}, "ports"),
    ({"ports": ["0:22"]}, "ports"),
    ({"ports": ["70000"]}, "ports"),
    ({"ports": ["2222:22", "2222:80"]}, "ports"),
    ({"ports": ["22"], "network": "none"}, "ports"),
    ({"network": "bridge=-evil,helper=/bin/sh"}, "network"),
    ({"network": "tap"}, "network"),
]


@pytest.mark.parametrize(("extra", "words"), BAD_CREATES)
async def test_bad_guest_access_input(inproc: InProcess, extra: dict[str, Any], words: str) -> None:
    """Refused before anything is written, naming what was wrong (the password never echoed)."""
    (inproc.root / "img.qcow2").write_bytes(b"")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(inproc.root / "img.qcow2"), "64M"], check=True)
    args = {k: v.replace("{root}", str(inproc.root)) if isinstance(v, str) else v for k, v in extra.items()}
    async with inproc.tools() as tools:
        answer = await tools.fails("manage_vm", name="bad", action="create", arch="x86_64", memory="64M", **args)
    assert words in answer["message"], answer
    assert "secret-pw" not in json.dumps(answer)
    assert not (inproc.vm_dir / "bad").exists()


async def test_bad_start_and_vm_guest_input(inproc: InProcess) -> None:
    async with inproc.tools() as tools:
        await tools.ok("manage_vm", name="plain", action="create", arch="x86_64", memory="64M", disk="size=16M")
        no_forward = await tools.fails("manage_vm", name="plain", action="start", wait="ssh")
        assert "port 22" in no_forward["message"]
        for bad in ("nan", "inf", 0, 1e9):
            answer = await tools.fails("manage_vm", name="plain", action="start", wait="agent", wait_timeout=bad)
            assert "wait_timeout" in answer["message"], (bad, answer)
        stopped = await tools.fails("vm_guest", name="plain", action="exec", command=["true"])
        assert "not running" in stopped["message"]
        for args, words in (
            ({"action": "exec"}, "command"),
            ({"action": "exec", "command": []}, "command"),
            ({"action": "exec", "command": ["true"], "env": {"1BAD": "x"}}, "env"),
            ({"action": "read_file"}, "path"),
            ({"action": "write_file", "path": "/tmp/x"}, "content"),
            ({"action": "write_file", "path": "/tmp/x", "content": "a", "mode": "rwx"}, "mode"),
            ({"action": "shell"}, "action"),
        ):
            answer = await tools.fails("vm_guest", name="plain", **args)
            assert words in answer["message"], (args, answer)
        await tools.ok("manage_vm", name="plain", action="delete")


async def test_stop_on_a_real_os(debian_pair: DebianPair) -> None:
    """The remote Debian guest stops gracefully (ACPI pressed again until it is heard, or the guest agent);
    last in this module: the local one serves other modules."""
    guest = debian_pair.remote
    async with open_tools(guest.url) as tools:
        stopped = await guest_call(tools, guest, "manage_vm", action="stop", stop_timeout=120)
    assert stopped["success"] and stopped["data"]["details"]["stopped_by"] in ("acpi", "guest-agent"), stopped
