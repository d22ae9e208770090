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

from .cloud_image import cloud_image  # noqa: F401 - session fixtures, registered once here
from .debian import debian_pair  # noqa: F401
from .guest_image import guest_isos  # noqa: F401
from .inprocess import inproc, inproc_tools, inproc_vm_name  # noqa: F401
from .sshd import remote_server_fixture, sshd_fixture  # noqa: F401
from .support import ServerProcess, ToolClient, kill_vms_under, open_tools, vm_name_for
from .test_fresh_machine import remove_early, start_early


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The bare-machine tests run last, and their machines start now: their minutes of set-up from nothing
    (apt, pip) overlap the rest of the suite instead of adding to it."""
    fresh = [item for item in items if item.nodeid.startswith("tests/test_fresh_machine.py::")]
    if fresh:
        items[:] = [item for item in items if item not in fresh] + fresh
        start_early()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    remove_early()


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
    (workdir / "vms").mkdir()
    with ServerProcess(
        vm_dir=workdir / "vms",
        env={
            "QEMU_MCP_ACCEL": os.environ.get("QEMU_MCP_TEST_ACCEL", "auto"),
            # Disks and ISOs of the tests live beside the vm_dir, under the session's directory.
            "QEMU_MCP_ALLOWED_ROOTS": str(workdir),
        },
    ) as srv:
        yield srv


@pytest.fixture
async def tools(server: ServerProcess) -> AsyncIterator[ToolClient]:
    async with open_tools(server.url) as client:
        yield client


@pytest.fixture
def vm_name(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[str]:
    """A VM name unique to the test; whatever the test leaves running is killed by PID."""
    name = vm_name_for(request.node.name)
    try:
        yield name
    finally:
        kill_vms_under(server.vm_dir / name)
