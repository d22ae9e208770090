"""Remote hosts over SSH, end to end: the real MCP client over HTTP, the server, a real sshd, real QEMU.

The "remote" host is the test sshd in its own network namespace (see tests/sshd.py); its VMs run as the SSH user
in their own vm_dir, and QMP reaches them through the SSH connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from .sshd import SSHServer
from .support import ServerProcess, ToolClient, alive, kill_vms_under, open_tools

QUICK_STOP = 1.0  # no guest OS answers ACPI: stop falls through to QMP quit


@pytest.fixture
async def rtools(remote_server: ServerProcess) -> AsyncIterator[ToolClient]:
    async with open_tools(remote_server.url) as client:
        yield client


@pytest.fixture
def rvm(request: pytest.FixtureRequest, sshd: SSHServer) -> Iterator[str]:
    name = "r-" + request.node.name.replace("_", "-")[5:35]
    try:
        yield name
    finally:
        kill_vms_under(sshd.vm_dir / name)


def pwd_args(sshd: SSHServer) -> dict[str, Any]:
    return {
        "host": sshd.address,
        "ssh_port": sshd.port,
        "ssh_user": sshd.user,
        "ssh_pwd": sshd.password,
        "vm_dir": str(sshd.vm_dir),
    }


def key_args(sshd: SSHServer) -> dict[str, Any]:
    return {
        "host": sshd.address,
        "ssh_port": sshd.port,
        "ssh_user": sshd.user,
        "ssh_key": str(sshd.key),
        "vm_dir": str(sshd.vm_dir),
    }


def ssh_health(server: ServerProcess) -> dict[str, Any]:
    body = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).json()
    return dict(body["ssh"])


def owner_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return pwd.getpwuid(int(line.split()[1])).pw_name
    raise AssertionError("no Uid line")


async def test_round_trip_with_password(rtools: ToolClient, sshd: SSHServer, rvm: str) -> None:
    """create, start, list, monitor (progress arrives), modify (restart), stop, delete, all over SSH."""
    remote = pwd_args(sshd)
    created = await rtools.ok("manage_vm", name=rvm, action="create", arch="x86_64", memory="64M", vcpus=1, **remote)
    assert created["data"]["host"] == sshd.address
    directory = sshd.vm_dir / rvm
    assert json.loads((directory / "vm.json").read_text())["memory_mib"] == 64
    assert (directory / "vm.json").stat().st_uid == pwd.getpwnam(sshd.user).pw_uid  # written by the SSH user

    started = await rtools.ok("manage_vm", name=rvm, action="start", **remote)
    assert started["message"] == f"VM {rvm} started on {sshd.address} (tcg)"
    assert started["data"]["details"]["run_state"] == "running"  # QMP answered through the SSH connection
    pid = started["data"]["details"]["pid"]
    assert owner_of(pid) == sshd.user

    listed = await rtools.ok("list_vms", status="running", filter_name=rvm, **remote)
    assert listed["message"] == f"Successfully obtained 1 running VM on {sshd.address}"
    vm = listed["data"]["vms"][0]
    assert (vm["name"], vm["status"], vm["run_state"], vm["pid"], vm["memory"]) == (
        rvm,
        "running",
        "running",
        pid,
        "64M",
    )

    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    result = await rtools.client.call_tool(
        "monitor_vm_status",
        {"name": rvm, "metrics": "all", "interval": 1, "count": 2, **remote},
        progress_callback=on_progress,
    )
    monitored = result.structured_content
    assert monitored is not None and monitored["success"], monitored
    assert monitored["data"]["host"] == sshd.address and len(monitored["data"]["metrics_data"]) == 2
    sample = monitored["data"]["metrics_data"][1]
    assert sample["cpu"]["vcpu_count"] == 1 and sample["memory"] is not None and "disk" in sample
    assert [p[0] for p in seen] == [1, 2] and json.loads(seen[0][2] or "{}")["cpu"]

    modified = await rtools.ok("manage_vm", name=rvm, action="modify", memory="96M", stop_timeout=QUICK_STOP, **remote)
    assert modified["data"]["details"]["restarted"] is True and modified["data"]["details"]["changed"] == ["memory"]
    relisted = await rtools.ok("list_vms", filter_name=rvm, **remote)
    assert relisted["data"]["vms"][0]["memory"] == "96M" and relisted["data"]["vms"][0]["status"] == "running"

    stopped = await rtools.ok("manage_vm", name=rvm, action="stop", stop_timeout=QUICK_STOP, **remote)
    assert stopped["data"]["details"]["stopped_by"] in ("acpi", "quit")
    deleted = await rtools.ok("manage_vm", name=rvm, action="delete", **remote)
    assert str(directory) in deleted["data"]["details"]["removed"]
    assert not directory.exists()


async def test_round_trip_with_key(rtools: ToolClient, sshd: SSHServer, rvm: str) -> None:
    """The key wins over a (wrong) password; the same VM is then reachable with the password too."""
    remote = {**key_args(sshd), "ssh_pwd": "not-the-password"}
    await rtools.ok("manage_vm", name=rvm, action="create", arch="amd64", memory="64M", vcpus=1, **remote)
    started = await rtools.ok("manage_vm", name=rvm, action="start", **remote)
    pid = started["data"]["details"]["pid"]
    by_pwd = await rtools.ok("list_vms", filter_name=rvm, **pwd_args(sshd))  # QMP shared per remote account
    assert by_pwd["data"]["vms"][0]["run_state"] == "running" and by_pwd["data"]["vms"][0]["pid"] == pid
    dup = await rtools.fails("manage_vm", name=rvm, action="create", arch="x86_64", **remote)
    assert dup["message"] == f"VM {rvm} already exists on {sshd.address}; delete it first or use another name"
    deleted = await rtools.ok("manage_vm", name=rvm, action="delete", stop_timeout=QUICK_STOP, **remote)
    assert deleted["data"]["details"]["stopped_by"] in ("acpi", "quit")
    assert not alive(pid)


async def test_pool_reuses_one_connection(rtools: ToolClient, remote_server: ServerProcess, sshd: SSHServer) -> None:
    """After the first call, 20 concurrent list_vms open no connection: one pooled connection serves them."""
    remote = key_args(sshd)
    await rtools.ok("list_vms", **remote)
    before = ssh_health(remote_server)
    began = time.monotonic()
    answers = await asyncio.gather(*(rtools.call("list_vms", **remote) for _ in range(20)))
    assert all(a["success"] for a in answers), answers
    after = ssh_health(remote_server)
    assert after["connections_opened"] == before["connections_opened"]
    assert after["open_connections"] == before["open_connections"]
    # One scan command per list_vms, and concurrent scans of one vm_dir coalesce into fewer runs.
    assert after["exec_requests"] - before["exec_requests"] <= len(answers) // 2, (before, after)
    print(f"20 concurrent warm list_vms: {time.monotonic() - began:.3f} s")


async def test_connection_rebuilt_after_sshd_restart(
    rtools: ToolClient, remote_server: ServerProcess, sshd: SSHServer, rvm: str
) -> None:
    """sshd restarted (every connection it served killed): the next call succeeds on a new connection,
    and QMP of a running VM is reached again through it."""
    remote = key_args(sshd)
    await rtools.ok("manage_vm", name=rvm, action="create", arch="x86_64", memory="64M", vcpus=1, **remote)
    pid = (await rtools.ok("manage_vm", name=rvm, action="start", **remote))["data"]["details"]["pid"]
    before = ssh_health(remote_server)["connections_opened"]
    sshd.restart()
    listed = await rtools.ok("list_vms", filter_name=rvm, **remote)
    assert listed["data"]["host"] == sshd.address
    vm = listed["data"]["vms"][0]
    assert (vm["status"], vm["run_state"], vm["pid"]) == ("running", "running", pid)  # QMP over the new connection
    assert ssh_health(remote_server)["connections_opened"] == before + 1
    await rtools.ok("manage_vm", name=rvm, action="delete", stop_timeout=QUICK_STOP, **remote)
    assert ssh_health(remote_server)["connections_opened"] == before + 1


async def test_bad_remote_inputs(rtools: ToolClient, remote_server: ServerProcess, sshd: SSHServer) -> None:
    """Each bad input is a clear success:false within the connect timeout; the server stays healthy."""
    good = pwd_args(sshd)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({**good, "ssh_pwd": "Wrong-" + sshd.password}, "HostAuthFailed", f"authentication as {sshd.user}"),
        ({**key_args(sshd), "ssh_key": str(sshd.key_dir / "missing")}, "InvalidInput", "does not exist on the server"),
        ({**key_args(sshd), "ssh_key": "/etc/ssh/ssh_host_ed25519_key"}, "InvalidInput", "ssh_key"),
        ({**good, "ssh_port": sshd.unused_port()}, "HostUnreachable", "refused the SSH connection"),
        ({**good, "ssh_user": None}, "InvalidInput", "Invalid 'ssh_user': required for the remote host"),
        ({**good, "ssh_pwd": None}, "InvalidInput", "give ssh_pwd or ssh_key"),
        ({**good, "host": "-oProxyCommand=x"}, "InvalidInput", "is not a host name"),
        ({**good, "host": "no-such-host.invalid"}, "HostUnreachable", "cannot resolve"),
        (
            {**good, "host": sshd.second_address},
            "HostKeyRejected",
            f"ssh-keyscan -p {sshd.port} {sshd.second_address} >> ",
        ),
    ]
    for args, error, words in cases:
        began = time.monotonic()
        answer = await rtools.fails("list_vms", **args)
        assert answer["data"]["error"] == error, (args.get("host"), answer)
        assert words in answer["message"], answer
        assert time.monotonic() - began < 3 + 2  # the server's connect timeout is 3 s
        assert sshd.password not in json.dumps(answer)
    unknown = await rtools.fails("manage_vm", name="x", action="start", **{**good, "host": sshd.second_address})
    assert "QEMU_MCP_SSH_HOST_KEY_POLICY=accept-new" in unknown["message"]
    assert httpx.get(f"http://127.0.0.1:{remote_server.port}/healthz", timeout=5).json()["status"] == "ok"
    assert (await rtools.ok("list_vms", **good))["success"]


async def test_unreachable_address_times_out_cleanly(rtools: ToolClient, sshd: SSHServer) -> None:
    """A black-holed address ends within the connect timeout with a clear message."""
    began = time.monotonic()
    answer = await rtools.fails("list_vms", **{**pwd_args(sshd), "host": "192.0.2.1", "ssh_port": 22})
    assert answer["data"]["error"] == "HostUnreachable", answer
    assert "192.0.2.1:22" in answer["message"]
    assert time.monotonic() - began < 3 + 2


async def test_named_host(rtools: ToolClient, remote_server: ServerProcess, sshd: SSHServer) -> None:
    """A host named in the server's settings needs no credentials from the client; arguments override."""
    listed = await rtools.ok("list_vms", host="lab", vm_dir=str(sshd.vm_dir))
    assert listed["data"]["host"] == "lab" and listed["message"].endswith("on lab")
    assert ssh_health(remote_server)["named_hosts"] == ["fenced", "lab"]
    other_user = await rtools.fails("list_vms", host="lab", ssh_user="nobody", vm_dir=str(sshd.vm_dir))
    assert other_user["data"]["error"] == "InvalidInput" and "may not change ssh_user" in other_user["message"]
    wrong = await rtools.fails("list_vms", host="lab", ssh_user="nobody", ssh_pwd="x", vm_dir=str(sshd.vm_dir))
    assert wrong["data"]["error"] == "HostAuthFailed" and "as nobody" in wrong["message"]
    with_pwd = await rtools.ok("list_vms", host="lab", ssh_pwd=sshd.password, vm_dir=str(sshd.vm_dir))
    assert with_pwd["data"]["host"] == "lab"


async def test_password_never_in_the_log(rtools: ToolClient, remote_server: ServerProcess, sshd: SSHServer) -> None:
    """No password, right or wrong, reaches the server's log (DEBUG level, asyncssh's own lines included)."""
    wrong = "Wrong-" + sshd.password
    await rtools.fails("list_vms", **{**pwd_args(sshd), "ssh_pwd": wrong})
    await rtools.ok("list_vms", **pwd_args(sshd))
    await asyncio.sleep(0.2)
    text = remote_server.log_text()
    assert "SSH connection to" in text and "DEBUG" in text  # the log did record SSH activity in detail
    assert sshd.password not in text and wrong not in text


async def test_named_host_allowed_roots(rtools: ToolClient, sshd: SSHServer) -> None:
    """A named host's allowed_roots fence vm_dir, disk and iso, resolved on the remote host itself."""
    inside = str(sshd.vm_dir)
    assert (await rtools.ok("list_vms", host="fenced", vm_dir=inside))["data"]["host"] == "fenced"
    escape = sshd.vm_dir / "escape"
    escape.symlink_to("/var")
    try:
        for bad in ("/tmp", f"{inside}/../keys", str(escape)):
            refused = await rtools.fails("list_vms", host="fenced", vm_dir=bad)
            assert (
                refused["data"]["error"] == "InvalidInput" and "outside the directories allowed" in refused["message"]
            )
        disk = await rtools.fails(
            "manage_vm", host="fenced", vm_dir=inside, name="f1", action="create", arch="x86_64",
            disk="path=/tmp/f1.qcow2,size=16M",
        )  # fmt: skip
        assert "disk" in disk["message"] and not (sshd.vm_dir / "f1").exists()
        # The same host reached without the name has no fence: the account's rights are the boundary.
        assert (await rtools.ok("list_vms", **{**key_args(sshd), "vm_dir": "/tmp"}))["success"]
    finally:
        escape.unlink()


async def test_server_keys_open_only_named_hosts(sshd: SSHServer, workdir: Path) -> None:
    """By default a client's ssh_key (a key of the server's) works for named hosts only: with host=<address> it
    would give remote mode, without the local fence, on any machine the key opens (this one included)."""
    named = workdir / "keys-hosts.json"
    named.write_text(json.dumps({"lab": {"address": sshd.address, "port": sshd.port, "user": sshd.user}}))
    (workdir / "keys-vms").mkdir()
    with ServerProcess(
        vm_dir=workdir / "keys-vms",
        env={
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
            "QEMU_MCP_SSH_KEY_DIRS": str(sshd.key_dir),
            "QEMU_MCP_SSH_HOSTS_FILE": str(named),
        },
    ) as srv:
        async with open_tools(srv.url) as t:
            refused = await t.fails("list_vms", **key_args(sshd))
            assert refused["data"]["error"] == "InvalidInput" and "named hosts" in refused["message"], refused
            assert "--allow-client-ssh-keys" in refused["message"]
            listed = await t.ok("list_vms", host="lab", ssh_key=str(sshd.key), vm_dir=str(sshd.vm_dir))
            assert listed["data"]["host"] == "lab"
            assert (await t.ok("list_vms", **pwd_args(sshd)))["success"]  # the client's own credential: fine


async def test_a_call_cannot_point_a_named_host_s_key_at_another_user_or_port(sshd: SSHServer, workdir: Path) -> None:
    """Issue 23: named host ``lab`` logs in as ``sshd.user`` with the operator's key, which the second account
    of the same sshd trusts too.  A call may not switch the user (nor the port) that key is tried on: not with
    ssh_user alone, not by naming the key itself, not with a password beside the key (the key would win).
    With a password of its own (the other user's) it may; sshd's log shows the key never logged in as the
    other user."""
    named = workdir / "users-hosts.json"
    named.write_text(
        json.dumps({"lab": {"address": sshd.address, "port": sshd.port, "user": sshd.user, "key": str(sshd.key)}})
    )
    (workdir / "users-vms").mkdir()
    where = {"host": "lab", "vm_dir": str(sshd.vm_dir)}
    with ServerProcess(
        vm_dir=workdir / "users-vms",
        env={
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
            "QEMU_MCP_SSH_KEY_DIRS": str(sshd.key_dir),
            "QEMU_MCP_SSH_HOSTS_FILE": str(named),
        },
    ) as srv:
        async with open_tools(srv.url) as t:
            for extra, field in (
                ({"ssh_user": sshd.other_user}, "ssh_user"),
                ({"ssh_user": sshd.other_user, "ssh_key": str(sshd.key)}, "ssh_user"),
                ({"ssh_user": sshd.other_user, "ssh_key": str(sshd.key), "ssh_pwd": "x"}, "ssh_user"),
                ({"ssh_port": sshd.unused_port()}, "ssh_port"),
            ):
                refused = await t.fails("list_vms", **where, **extra)
                assert refused["data"]["error"] == "InvalidInput", (extra, refused)
                assert f"Invalid '{field}'" in refused["message"], refused
                assert (
                    "may not change ssh_user or ssh_port unless it brings its own credential (ssh_pwd)"
                    in (refused["message"])
                )
            own = await t.ok("list_vms", **where, ssh_user=sshd.other_user, ssh_pwd=sshd.other_password)
            assert own["data"]["host"] == "lab"
            same = await t.ok("list_vms", **where, ssh_user=sshd.user)  # the entry's own user: as configured
            assert same["data"]["host"] == "lab"
    log = sshd.log_path.read_text(errors="replace")
    assert f"Accepted password for {sshd.other_user}" in log
    assert f"Accepted publickey for {sshd.other_user}" not in log
    assert f"Accepted publickey for {sshd.user}" in log


async def test_remote_hardening(rtools: ToolClient, sshd: SSHServer) -> None:
    """Over SSH the same rules hold, checked on the remote host: bounded scans, image chains inside the
    named host's roots, no disk inside another VM's directory."""
    args = {"host": "fenced", "vm_dir": str(sshd.vm_dir)}
    await rtools.ok("manage_vm", **args, name="rh1", action="create", arch="x86_64", memory="64M", disk="size=16M")
    pidfile = sshd.vm_dir / "rh1" / "qemu.pid"
    try:
        with open(pidfile, "wb") as f:
            f.truncate(1 << 30)
        began = time.monotonic()
        vm = (await rtools.ok("list_vms", **args, filter_name="rh1"))["data"]["vms"][0]
        assert time.monotonic() - began < 10 and vm["status"] == "stopped"
    finally:
        pidfile.unlink()
    planted = sshd.vm_dir / "planted.img"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(planted), "1M"], check=True
    )
    os.chown(planted, pwd.getpwnam(sshd.user).pw_uid, -1)
    try:
        refused = await rtools.fails(
            "manage_vm", **args, name="rh2", action="create", arch="x86_64", disk=f"path={planted}"
        )
        assert "outside the directories allowed on fenced" in refused["message"], refused
        inside = await rtools.fails(
            "manage_vm", **args, name="rh3", action="create", arch="x86_64",
            disk=f"path={sshd.vm_dir}/rh1/vm.json",
        )  # fmt: skip
        assert inside["data"]["error"] == "InvalidInput", inside
    finally:
        planted.unlink()
    await rtools.ok("manage_vm", **args, name="rh1", action="delete")
