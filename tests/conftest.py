"""Shared fixtures: a real qemu-mcp-http server process on a loopback port, driven by the real MCP client.

Every QEMU a test starts lives under a vm_dir of the test session; teardown
kills whatever is left there by PID (from the pid files), even when tests fail.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .guest_image import guest_isos  # noqa: F401 - session fixtures, registered once here
from .sshd import remote_server_fixture, sshd_fixture  # noqa: F401
from .support import ServerProcess, ToolClient, kill_vms_under, open_tools


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    # Short paths: a QMP socket path must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="qmh-", dir="/tmp"))
    try:
        yield root
    finally:
        kill_vms_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def server(workdir: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        vm_dir=workdir / "vms",
        env={
            "QEMU_MCP_ACCEL": os.environ.get("QEMU_MCP_TEST_ACCEL", "auto"),
            # Disks and ISOs of the tests live beside the vm_dir, under the session's directory.
            "QEMU_MCP_ALLOWED_ROOTS": str(workdir),
        },
    )
    srv.vm_dir.mkdir()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        kill_vms_under(srv.vm_dir)


@pytest.fixture
async def tools(server: ServerProcess) -> AsyncIterator[ToolClient]:
    async with open_tools(server.url) as client:
        yield client


@pytest.fixture
def vm_name(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[str]:
    """A VM name unique to the test; whatever the test leaves running is killed by PID."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    try:
        yield name
    finally:
        kill_vms_under(server.vm_dir / name)
