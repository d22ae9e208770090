"""Who may call and what they may touch: tokens, Host/Origin, allowed roots, symlinks, secrets, limits."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from .inprocess import InProcess, open_app
from .support import ServerProcess, ToolClient, free_port, open_tools

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def write_token_file(path: Path) -> str:
    token = secrets.token_urlsafe(24)
    path.write_text(f"# client-id token\nci-robot {token}\n")
    return token


@pytest.fixture(scope="module")
def token_server(workdir: Path) -> Iterator[tuple[ServerProcess, str]]:
    token = write_token_file(workdir / "tokens")
    (workdir / "token-vms").mkdir()
    with ServerProcess(
        vm_dir=workdir / "token-vms",
        env={
            "QEMU_MCP_TOKEN_FILE": str(workdir / "tokens"),
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_MAX_MONITOR_STREAMS_PER_CLIENT": "1",
            "QEMU_MCP_ALLOWED_ROOTS": str(workdir / "token-vms"),
        },
    ) as srv:
        yield srv, token


@pytest.fixture
async def token_app(tmp_path: Path) -> AsyncIterator[tuple[InProcess, str]]:
    """The app in this process, with the token file of ``token_server``."""
    token = write_token_file(tmp_path / "tokens")
    async with open_app(tmp_path, token_file=str(tmp_path / "tokens")) as app:
        yield app, token


async def post_mcp(app: InProcess, headers: dict[str, str], body: bytes | None = None) -> httpx.Response:
    content = body if body is not None else json.dumps(INITIALIZE).encode()
    return await app.http.post(app.url, content=content, headers={**MCP_HEADERS, **headers})


async def test_token_required(token_app: tuple[InProcess, str]) -> None:
    app, token = token_app
    assert (await post_mcp(app, {})).status_code == 401
    assert (await post_mcp(app, {"Authorization": "Bearer " + "x" * len(token)})).status_code == 401
    assert (await post_mcp(app, {"Authorization": token})).status_code == 401
    assert (await post_mcp(app, {"Authorization": f"Bearer {token}"})).status_code == 200
    assert (await app.http.get("/healthz")).status_code == 200  # health checks need no token


async def test_authenticated_calls_are_audited_without_secrets(token_server: tuple[ServerProcess, str]) -> None:
    srv, token = token_server
    async with open_tools(srv.url, headers={"Authorization": f"Bearer {token}"}) as t:
        await t.ok("manage_vm", name="audited", action="create", arch="x86_64", memory="128M", vcpus=1)
        await t.fails("manage_vm", name="audited", action="create", arch="x86_64")
        await t.ok("manage_vm", name="audited", action="delete")
    lines = [
        json.loads(line.split("qemu_mcp_http.audit: ", 1)[1])
        for line in srv.log_text().splitlines()
        if "audit:" in line
    ]
    assert [(a["client"], a["vm"], a["action"], a["success"]) for a in lines[-3:]] == [
        ("ci-robot", "audited", "create", True),
        ("ci-robot", "audited", "create", False),
        ("ci-robot", "audited", "delete", True),
    ]
    assert all(a["host"] == "localhost" and a["time"] for a in lines)
    assert token not in srv.log_text()


def test_refuses_non_loopback_without_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_MCP_")}
    proc = subprocess.run(
        [sys.executable, "-m", "qemu_mcp_http", "--host", "0.0.0.0", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "set a bearer token" in proc.stderr and "--allow-unauthenticated" in proc.stderr


async def test_host_and_origin_checked(inproc: InProcess) -> None:
    assert (await post_mcp(inproc, {"Origin": "http://evil.example"})).status_code == 403
    assert (await post_mcp(inproc, {"Host": "evil.example"})).status_code == 421
    assert (await post_mcp(inproc, {"Host": "evil.example:8000"})).status_code == 421
    ok = await post_mcp(inproc, {"Origin": f"http://127.0.0.1:{inproc.settings.port}"})
    assert ok.status_code == 200


async def test_request_body_limit(inproc: InProcess) -> None:
    huge = json.dumps({**INITIALIZE, "padding": "x" * (2 << 20)}).encode()
    assert (await post_mcp(inproc, {}, huge)).status_code == 413


async def test_paths_outside_roots(tools: ToolClient, workdir: Path, server: ServerProcess, vm_name: str) -> None:
    link = workdir / "link-to-etc"
    if not link.exists():
        link.symlink_to("/etc")
    cases = [
        {"disk": "path=/etc/qmh-evil.qcow2,size=1G"},
        {"disk": f"path={link}/qmh-evil.qcow2,size=1G"},  # inside the root by name, outside once resolved
        {"iso": f"{workdir}/../../etc/passwd"},
        {"iso": "/etc/passwd"},
        {"vm_dir": "/etc"},
        {"vm_dir": f"{link}"},
    ]
    for extra in cases:
        answer = await tools.fails("manage_vm", name=vm_name, action="create", arch="x86_64", **extra)
        assert "outside the directories this server allows" in answer["message"], (extra, answer)
    assert not Path("/etc/qmh-evil.qcow2").exists()
    assert not (server.vm_dir / vm_name).exists()


async def test_delete_does_not_follow_planted_symlinks(tools: ToolClient, workdir: Path, server: ServerProcess) -> None:
    precious = workdir / "precious"
    precious.mkdir(exist_ok=True)
    (precious / "data.txt").write_text("keep me")
    name = "symlinked"
    await tools.ok("manage_vm", name=name, action="create", arch="x86_64", memory="128M", disk="size=64M")
    vm_path = server.vm_dir / name
    (vm_path / "evil-dir").symlink_to(precious)
    (vm_path / "evil-file").symlink_to(precious / "data.txt")
    # The tool's own disk replaced by a link to a file it never created.
    disk = vm_path / f"{name}.qcow2"
    disk.unlink()
    disk.symlink_to(precious / "data.txt")
    deleted = (await tools.ok("manage_vm", name=name, action="delete"))["data"]["details"]
    assert (precious / "data.txt").read_text() == "keep me"
    assert (precious).is_dir()
    # Only what the server made is removed; the planted links are kept (as links) and named.
    assert not (vm_path / "vm.json").exists()
    assert str(disk) not in deleted["removed"]
    assert sorted(deleted["kept"]) == sorted([str(disk), str(vm_path / "evil-dir"), str(vm_path / "evil-file")])
    assert "no longer the file create made" in deleted["note"]
    shutil.rmtree(vm_path)


async def test_secrets_never_echoed(tools: ToolClient, server: ServerProcess) -> None:
    password = "Sup3r-Secret-" + secrets.token_hex(6)
    answers = [
        await tools.fails(
            "manage_vm",
            name="remote-vm",
            action="start",
            host="127.0.0.1",
            ssh_port=free_port(),
            ssh_user="nobody",
            ssh_pwd=password,
        ),
        await tools.fails(
            "list_vms", host="127.0.0.1", ssh_port=free_port(), ssh_user="nobody", ssh_pwd=password, status="bogus"
        ),
        await tools.fails("list_vms", host="127.0.0.1", ssh_user="nobody", ssh_pwd=password, ssh_key="/etc/shadow"),
    ]
    assert "ssh_key" in answers[2]["message"] and "outside" in answers[2]["message"]
    for answer in answers:
        assert password not in json.dumps(answer)
        assert "root:" not in json.dumps(answer)  # nothing of the key file's content
    await asyncio.sleep(0.2)
    assert password not in server.log_text()


async def test_monitor_streams_per_client(token_server: tuple[ServerProcess, str]) -> None:
    srv, token = token_server
    auth = {"Authorization": f"Bearer {token}"}
    async with open_tools(srv.url, headers=auth) as t:
        await t.ok("manage_vm", name="watched", action="create", arch="x86_64", memory="128M", vcpus=1)
        await t.ok("manage_vm", name="watched", action="start")
        try:
            first = asyncio.create_task(t.call("monitor_vm_status", name="watched", metrics="cpu", interval=1, count=3))
            await asyncio.sleep(1.0)
            second = await t.fails("monitor_vm_status", name="watched", metrics="cpu", interval=1, count=1)
            assert "limit 1" in second["message"]
            assert (await first)["success"]
            # The slot is released afterwards.
            await t.ok("monitor_vm_status", name="watched", metrics="cpu", interval=1, count=1)
        finally:
            await t.call("manage_vm", name="watched", action="delete", stop_timeout=1)
