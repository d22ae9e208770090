"""The app in this process, for checks that need neither QEMU nor a server process.

``build_app(Settings(...))`` with its lifespan entered, reached through ``httpx.ASGITransport``: plain
requests with :attr:`InProcess.http`, tool calls with the real MCP client over the same transport
(:meth:`InProcess.tools`).  The transport hands a response over once the app has finished it, so SSE
responses arrive whole: fine for answers, not for watching progress as it streams (use a server process).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from starlette.applications import Starlette

from qemu_mcp_http.app import build_app
from qemu_mcp_http.config import Settings

from .support import ToolClient, open_tools, owned, vm_name_for


@dataclass
class InProcess:
    """An app of this process: its settings, and an HTTP client that reaches it without a socket."""

    app: Starlette
    settings: Settings
    root: Path
    http: httpx.AsyncClient

    @property
    def vm_dir(self) -> Path:
        return Path(self.settings.vm_dir)

    @property
    def base(self) -> str:
        """What a client of a server on the settings' port would use: the same Host header."""
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def tools(self, headers: dict[str, str] | None = None) -> AbstractAsyncContextManager[ToolClient]:
        """The real MCP client, connected to this app."""
        return open_tools(self.url, headers, transport=httpx.ASGITransport(app=self.app))


@contextlib.asynccontextmanager
async def _serve(root: Path, settings: dict[str, Any]) -> AsyncIterator[InProcess]:
    vm_dir = root / "vms"
    vm_dir.mkdir(exist_ok=True)
    # As the session's server: the VMs' directory and what lies beside it are the allowed roots. TCG, so
    # that the lifespan starts no accelerator probe (a QEMU).
    config = Settings(**{"vm_dir": str(vm_dir), "accel": "tcg", "allowed_roots": (str(root),), **settings})
    app = build_app(config)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://127.0.0.1:{config.port}") as http,
    ):
        yield InProcess(app, config, root, http)


def open_app(root: Path, **settings: Any) -> AbstractAsyncContextManager[InProcess]:
    """The app built from ``Settings(vm_dir=root/"vms", accel="tcg", allowed_roots=(root,), **settings)``, its
    lifespan entered (and left) by a task of its own."""
    return owned(_serve(root, settings))


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[InProcess]:
    """An app of this process with default settings, under the test's own directory."""
    async with open_app(tmp_path) as app:
        yield app


@pytest.fixture
async def inproc_tools(inproc: InProcess) -> AsyncIterator[ToolClient]:
    async with inproc.tools() as client:
        yield client


@pytest.fixture
def inproc_vm_name(request: pytest.FixtureRequest) -> str:
    """A VM name unique to the test (its vm_dir is its own: nothing to clean up)."""
    return vm_name_for(request.node.name)
