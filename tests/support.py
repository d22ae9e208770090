"""Test support: a real qemu-mcp-http server process and a real MCP client over streamable HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_vms_under(root: Path) -> list[int]:
    """Kill -9 every QEMU whose pid file lies under ``root`` and whose cmdline points back there."""
    killed = []
    for pidfile in root.rglob("qemu.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(pidfile.parent).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@dataclass
class ServerProcess:
    """A ``python -m qemu_mcp_http`` child process."""

    vm_dir: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout: float = 20.0) -> None:
        env = {
            **os.environ,
            "QEMU_MCP_VM_DIR": str(self.vm_dir),
            "QEMU_MCP_PORT": str(self.port),
            "QEMU_MCP_LOG_LEVEL": "INFO",
            **self.env,
        }
        self.log_path = self.vm_dir.parent / f"server-{self.port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "qemu_mcp_http"], env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer /healthz: {self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


class ToolClient:
    """Calls tools through the real MCP client over streamable HTTP; returns the structured envelope."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result = await self.client.call_tool(tool, arguments)
        envelope = result.structured_content
        assert envelope is not None, result
        # The text content carries the same envelope as JSON.
        assert json.loads(result.content[0].text) == envelope  # type: ignore[union-attr]
        assert envelope["success"] is (not result.is_error)
        return dict(envelope)

    async def ok(self, tool: str, **arguments: Any) -> dict[str, Any]:
        envelope = await self.call(tool, **arguments)
        assert envelope["success"], envelope
        return envelope

    async def fails(self, tool: str, **arguments: Any) -> dict[str, Any]:
        envelope = await self.call(tool, **arguments)
        assert not envelope["success"], envelope
        return envelope


async def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False


@contextlib.asynccontextmanager
async def open_tools(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[ToolClient]:
    """A connected :class:`ToolClient` whose MCP session lives in a task of its own.

    pytest-asyncio may run a fixture's setup and teardown in different tasks, and
    anyio's cancel scopes inside the client must be left by the task that entered
    them; a dedicated owner task makes that always true.  Calls may come from any task.
    """
    ready: asyncio.Future[ToolClient] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def own_session() -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                if headers:
                    http = await stack.enter_async_context(create_mcp_http_client(headers=headers))
                    client = await stack.enter_async_context(Client(streamable_http_client(url, http_client=http)))
                else:
                    client = await stack.enter_async_context(Client(url))
                ready.set_result(ToolClient(client))
                await done.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    owner = asyncio.create_task(own_session())
    try:
        yield await ready
    finally:
        done.set()
        await asyncio.wait_for(owner, 10)
