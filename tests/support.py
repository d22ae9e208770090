"""Test support: a real qemu-mcp-http server process, a real MCP client over streamable HTTP, and the small
process helpers the tests (and the benchmarks) share: free ports, QEMU pids, killing by PID, slowed commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx2 as httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

REPO = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on ``address`` right now."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def vm_name_for(test_name: str) -> str:
    """A VM name unique to the test, from its node name (``request.node.name``)."""
    return test_name.replace("[", "-").replace("]", "").replace("_", "-")[:40]


def pid_of(vm_dir: Path, name: str) -> int:
    """The pid QEMU wrote for the VM ``name`` of ``vm_dir``."""
    return int((vm_dir / name / "qemu.pid").read_text())


def alive(pid: int) -> bool:
    """A live process (a zombie waiting for init to reap it has an empty cmdline)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def pids_running(pattern: str) -> list[int]:
    """The pids whose command line matches ``pattern`` (``pgrep -f``)."""
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


def kill_groups(pids: Iterable[int]) -> None:
    """SIGKILL the process group each pid leads (the server starts every command in its own session)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def slow_command_path(bin_dir: Path, command: str, when_args_match: str, seconds: float = 30) -> str:
    """A PATH whose ``command`` sleeps ``seconds`` first when its arguments, joined by spaces, match
    ``when_args_match`` (``*`` matches anything, the rest is literal), then runs the real one: so that a
    server can be killed in the middle of a call that runs it."""
    bin_dir.mkdir(exist_ok=True)
    real = shutil.which(command)
    assert real, command
    pattern = "*".join(shlex.quote(part) for part in when_args_match.split("*"))
    shim = bin_dir / command
    shim.write_text(f'#!/bin/sh\ncase "$*" in {pattern}) sleep {seconds} ;; esac\nexec {real} "$@"\n')
    shim.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


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
    """A ``python -m qemu_mcp_http`` child process.

    ``with ServerProcess(vm_dir=..., env=...) as srv:`` starts it, and on the way out (a failure included)
    stops it and kills every QEMU under ``reap_under`` (default: its ``vm_dir``) by PID.  ``start()`` and
    ``stop()`` stay for tests that stop or restart a server on purpose inside that block.
    """

    vm_dir: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: Where the exit of the ``with`` block kills every QEMU left (default: ``vm_dir``).
    reap_under: Path | None = None

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server, then kill every QEMU under ``reap_under`` by PID."""
        try:
            self.stop()
        finally:
            kill_vms_under(self.reap_under or self.vm_dir)

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
async def owned(context: AbstractAsyncContextManager[T], timeout: float = 10) -> AsyncIterator[T]:
    """``context`` entered and left by a task of its own; its value is usable from any task.

    pytest-asyncio may run a fixture's setup and teardown in different tasks, and anyio's
    cancel scopes (inside the MCP client, the app's lifespan) must be left by the task that
    entered them; a dedicated owner task makes that always true.
    """
    ready: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def own() -> None:
        try:
            async with context as value:
                ready.set_result(value)
                await done.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    owner = asyncio.create_task(own())
    try:
        yield await ready
    finally:
        done.set()
        await asyncio.wait_for(owner, timeout)


@contextlib.asynccontextmanager
async def _tool_session(
    url: str, headers: dict[str, str] | None, transport: httpx.AsyncBaseTransport | None
) -> AsyncIterator[ToolClient]:
    async with contextlib.AsyncExitStack() as stack:
        if transport is not None:
            http = await stack.enter_async_context(httpx.AsyncClient(transport=transport, headers=headers))
            client = await stack.enter_async_context(Client(streamable_http_client(url, http_client=http)))
        elif headers:
            http = await stack.enter_async_context(create_mcp_http_client(headers=headers))
            client = await stack.enter_async_context(Client(streamable_http_client(url, http_client=http)))
        else:
            client = await stack.enter_async_context(Client(url))
        yield ToolClient(client)


def open_tools(
    url: str, headers: dict[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> AbstractAsyncContextManager[ToolClient]:
    """A connected :class:`ToolClient` whose MCP session lives in a task of its own (see :func:`owned`);
    calls may come from any task.  ``transport``: another way to the server than the network (e.g. an
    ``httpx.ASGITransport`` of an app in this process)."""
    return owned(_tool_session(url, headers, transport))
