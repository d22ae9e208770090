"""Operations: JSON logs, the Prometheus /metrics scrape, ``--version`` and ``--check``, on a real server process."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qemu_mcp_http import __version__

from .inprocess import open_app
from .sshd import SSHServer
from .support import ServerProcess, free_port, open_tools


@dataclass
class OpsServer:
    srv: ServerProcess
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.srv.port}/metrics"

    def log_lines(self) -> list[dict[str, Any]]:
        lines = [line for line in self.srv.log_text().splitlines() if line.strip()]
        return [json.loads(line) for line in lines]  # every line is one JSON object


@pytest.fixture(scope="module")
def ops(workdir: Path) -> Iterator[OpsServer]:
    token = secrets.token_urlsafe(24)
    (workdir / "ops-tokens").write_text(f"scraper {token}\n")
    (workdir / "ops-known-hosts").write_text("")
    vm_dir = workdir / "ops-vms"
    vm_dir.mkdir()
    with ServerProcess(
        vm_dir=vm_dir,
        env={
            "QEMU_MCP_TOKEN_FILE": str(workdir / "ops-tokens"),
            "QEMU_MCP_LOG_FORMAT": "json",
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_ALLOWED_ROOTS": str(vm_dir),
            "QEMU_MCP_SSH_KNOWN_HOSTS": str(workdir / "ops-known-hosts"),
        },
    ) as srv:
        yield OpsServer(srv, token)


async def scrape(ops: OpsServer | ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of one scrape, parsed by prometheus-client's own parser."""
    srv, auth = (ops.srv, ops.auth) if isinstance(ops, OpsServer) else (ops, {})
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://127.0.0.1:{srv.port}/metrics", headers=auth)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_after_calls(ops: OpsServer) -> None:
    """Calls, failures, durations, SSH pool counts, monitor streams and VMs by state all show in a scrape."""
    password = "Scrape-Secret-" + secrets.token_hex(6)
    before = await scrape(ops)
    async with open_tools(ops.srv.url, headers=ops.auth) as t:
        await t.ok("manage_vm", name="metered", action="create", arch="x86_64", memory="128M", vcpus=1)
        await t.ok("manage_vm", name="metered", action="start")
        try:
            monitor = asyncio.create_task(t.call("monitor_vm_status", name="metered", interval=1, count=2))
            await asyncio.sleep(0.7)
            during = await scrape(ops)
            assert (await monitor)["success"]
            await t.ok("list_vms")
            listed = await scrape(ops)
            await t.fails("list_vms", host="127.0.0.1", ssh_port=free_port(), ssh_user="x", ssh_pwd=password)
            await t.fails("manage_vm", name="metered", action="explode")
        finally:
            await t.call("manage_vm", name="metered", action="delete", stop_timeout=0)
        await t.ok("list_vms")
    after = await scrape(ops)

    assert value(during, "qemu_mcp_monitor_streams") == 1
    assert value(after, "qemu_mcp_monitor_streams") == 0
    vm_dir = str(ops.srv.vm_dir)
    assert value(listed, "qemu_mcp_vms", host="localhost", vm_dir=vm_dir, state="running") == 1
    assert value(after, "qemu_mcp_vms", host="localhost", vm_dir=vm_dir, state="running") == 0

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("qemu_mcp_tool_calls_total", tool="manage_vm", outcome="success") == 3
    assert moved("qemu_mcp_tool_calls_total", tool="manage_vm", outcome="failure") == 1  # the bad action
    assert moved("qemu_mcp_tool_calls_total", tool="list_vms", outcome="success") == 2
    assert moved("qemu_mcp_tool_calls_total", tool="list_vms", outcome="failure") == 1
    assert moved("qemu_mcp_tool_calls_total", tool="monitor_vm_status", outcome="success") == 1
    assert moved("qemu_mcp_tool_call_duration_seconds_count", tool="list_vms") == 3
    # Two samples one second apart: the call took at least a second.
    assert moved("qemu_mcp_tool_call_duration_seconds_bucket", tool="monitor_vm_status", le="0.5") == 0
    assert moved("qemu_mcp_tool_call_duration_seconds_bucket", tool="monitor_vm_status", le="+Inf") == 1
    assert moved("qemu_mcp_ssh_connect_failures_total") == 1  # the closed port
    assert value(after, "qemu_mcp_build_info", version=__version__) == 1
    async with httpx.AsyncClient(timeout=10) as http:
        assert password not in (await http.get(ops.metrics_url, headers=ops.auth)).text


async def test_ssh_pool_metrics(remote_server: ServerProcess, sshd: SSHServer) -> None:
    """Over a real sshd: connections opened and reused, open per target, and the remote VMs by state."""
    before = await scrape(remote_server)
    where = {"host": "lab", "vm_dir": str(sshd.vm_dir)}
    async with open_tools(remote_server.url) as t:
        await t.ok(
            "manage_vm", **where, name="metric-vm", action="create", arch="x86_64", memory="64M", disk="size=16M"
        )
        try:
            for _ in range(2):
                await t.ok("list_vms", **where)
            after = await scrape(remote_server)
        finally:
            await t.ok("manage_vm", **where, name="metric-vm", action="delete")
    opened = value(after, "qemu_mcp_ssh_connections_opened_total")
    assert opened >= 1
    reused = value(after, "qemu_mcp_ssh_connections_reused_total") - value(
        before, "qemu_mcp_ssh_connections_reused_total"
    )
    assert reused >= 1  # the second call, at least, found the connection open
    target = f"{sshd.user}@{sshd.address}:{sshd.port}"
    assert value(after, "qemu_mcp_ssh_open_connections", target=target) >= 1
    assert value(after, "qemu_mcp_ssh_exec_requests_total") > value(before, "qemu_mcp_ssh_exec_requests_total") or (
        value(after, "qemu_mcp_ssh_sftp_requests_total") > value(before, "qemu_mcp_ssh_sftp_requests_total")
    )
    assert value(after, "qemu_mcp_vms", host="lab", vm_dir=str(sshd.vm_dir), state="stopped") >= 1


async def test_metrics_need_the_token(tmp_path: Path) -> None:
    """With a token configured, /metrics wants it as /mcp does; /healthz stays open for health checks."""
    token = secrets.token_urlsafe(24)
    (tmp_path / "ops-tokens").write_text(f"scraper {token}\n")
    async with open_app(tmp_path, token_file=str(tmp_path / "ops-tokens")) as app:
        http = app.http
        assert (await http.get("/metrics")).status_code == 401
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer " + "x" * len(token)})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/metrics", headers={"Authorization": token})).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})).status_code == 200
        assert (await http.get("/healthz")).status_code == 200


async def test_json_logs_carry_the_call_and_no_secret(ops: OpsServer) -> None:
    """One JSON line per call (request id, tool, host, VM, duration, outcome); the audit line shares its request id."""
    password = "Log-Secret-" + secrets.token_hex(6)
    async with open_tools(ops.srv.url, headers=ops.auth) as t:
        await t.fails("list_vms", host="127.0.0.1", ssh_port=free_port(), ssh_user="x", ssh_pwd=password)
        await t.ok("manage_vm", name="logged", action="create", arch="x86_64", memory="128M", vcpus=1)
        await t.ok("manage_vm", name="logged", action="delete")
    await asyncio.sleep(0.2)
    assert password not in ops.srv.log_text()
    lines = ops.log_lines()
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    calls = [line for line in lines if line["logger"] == "qemu_mcp_http.calls"]
    failed = [c for c in calls if c["tool"] == "list_vms" and c["host"] == "127.0.0.1"][-1]
    assert failed["outcome"] == "failure" and failed["error"] == "HostUnreachable"
    assert failed["level"] == "INFO" and failed["request_id"] and isinstance(failed["duration_ms"], float)
    create = [c for c in calls if c.get("vm") == "logged" and c.get("action") == "create"][-1]
    assert (create["tool"], create["host"], create["outcome"]) == ("manage_vm", "localhost", "success")
    assert "error" not in create
    audit = [line for line in lines if line["logger"] == "qemu_mcp_http.audit" and '"vm":"logged"' in line["message"]]
    assert json.loads(audit[0]["message"])["action"] == "create"  # the audit line itself, unchanged
    assert audit[0]["request_id"] == create["request_id"]
    assert ops.token not in ops.srv.log_text()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_MCP_")}
    return subprocess.run(
        [sys.executable, "-m", "qemu_mcp_http", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"qemu-mcp-http {__version__}"


def test_check_passes_here(workdir: Path) -> None:
    """On a machine set up by scripts/test: exit 0 (KVM may be only a warning: TCG then)."""
    proc = run_cli("--check", "--vm-dir", str(workdir / "check-vms"), "--kvm-probe-timeout", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = proc.stdout.splitlines()
    assert any(line.startswith("ok   qemu-img: ") for line in report)
    assert any(line.startswith(("ok   accelerator", "warn accelerator")) for line in report)
    assert report[-1].startswith("usable")


def test_check_fails_without_qemu(workdir: Path) -> None:
    """No QEMU on PATH: exit 1, and the report names the missing binaries and their packages."""
    proc = run_cli("--check", "--vm-dir", str(workdir / "check-vms"), env={"PATH": str(workdir / "empty-bin")})
    assert proc.returncode == 1, proc.stdout
    assert "fail qemu-system-x86_64: not found on PATH -> install the Debian package qemu-system-x86" in proc.stdout
    assert "qemu-img: not found" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("NOT usable")
    bad = run_cli("--check", env={"QEMU_MCP_PORT": "eighty"})
    assert bad.returncode == 1 and "fail configuration: QEMU_MCP_PORT" in bad.stdout


async def test_healthz_tells_the_accelerator_from_startup(server: ServerProcess) -> None:
    """With accel=auto the server probes at start: /healthz says which accelerator guests get, and why."""

    def accel() -> dict[str, str]:
        found: dict[str, str] = httpx.get(server.url.replace("/mcp", "/healthz"), timeout=5).json()["accel"]
        return found

    if os.environ.get("QEMU_MCP_TEST_ACCEL", "auto") != "auto":
        pytest.skip("the session server does not run with accel=auto")
    for _ in range(300):  # the probe boots a tiny guest under each accelerator: a few seconds at most
        if accel():
            break
        await asyncio.sleep(0.1)
    decided = accel()
    assert "localhost/x86_64" in decided, decided  # (arm64 too, once a test started an arm64 guest)
    assert decided["localhost/x86_64"].startswith(("kvm (", "tcg (")), decided
    assert "accelerator for x86_64 guests on localhost" in server.log_text()


async def test_idle_connections_outlive_the_clients_own_timeout(server: ServerProcess) -> None:
    """An HTTP connection idle for longer than httpx's keep-alive (5 s) is still open on the server's side, so
    a client (or a load balancer) that reuses it just as its own timeout ends never meets a connection the
    server closed under it (uvicorn's default is also 5 s: a race that lost requests)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
    try:
        for _ in range(2):
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))  # fmt: skip
            await reader.readexactly(length)
            await asyncio.sleep(6.0)
    finally:
        writer.close()
