"""The TypeScript MCP SDK (``tests/ts/client.mjs``, in Node) as a second, independent client of the real server.

Over streamable HTTP it lists the resources (following the cursor), the templates, reads a running busybox
guest's resource and console, completes the template's ``name``, subscribes, and hears
``notifications/resources/updated`` when the guest powers itself off; against a VM that does not exist its read
fails cleanly. The SDK is installed with npm once into a cache keyed by ``tests/ts`` (``$QEMU_MCP_TEST_NPM_CACHE``,
default ``~/.cache/qemu-mcp-http/ts-client``); without node and npm the tests fail (``scripts/setup.sh --test``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .buildcache import build_directory, locked, prune_stale
from .guest_image import READY_MARKER, GuestISOs
from .support import ServerProcess, ToolClient

TS_SRC = Path(__file__).resolve().parent / "ts"
SDK = "@modelcontextprotocol/sdk"
SDK_VERSION: str = json.loads((TS_SRC / "package.json").read_text())["dependencies"][SDK]
#: A cold install downloads about 100 packages (~30 MB unpacked).
INSTALL_TIMEOUT = 300.0
BOOT = 120.0
#: How long the guest's poweroff may take to reach the client as notifications/resources/updated.
NOTIFIED = 30.0
QUICK = 1.0
TEMPLATE = "vm://{host}/{name}"


@dataclass(frozen=True)
class TSClient:
    node: str
    #: client.mjs beside a node_modules that links to the cached install.
    script: Path
    #: Seconds spent in ``npm install`` (0 when the cache held it).
    install_seconds: float


def _installed(node_modules: Path) -> bool:
    try:
        manifest = json.loads((node_modules / SDK / "package.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(manifest.get("version") == SDK_VERSION)


def install_ts_client(npm: str) -> tuple[Path, float]:
    """``node_modules`` of ``tests/ts``'s package, installed once per version of its files; and the seconds
    ``npm ci`` took (0 when cached). ``npm ci`` installs exactly ``package-lock.json``, integrity hashes checked.
    npm runs in a scratch directory whose node_modules is then renamed into place, so an install killed half-way
    is never taken for a finished one.

    :raise RuntimeError: npm failed; the message holds its output.
    """
    directory = build_directory("QEMU_MCP_TEST_NPM_CACHE", "ts-client", TS_SRC)
    node_modules = directory / "node_modules"
    spent = 0.0
    with locked(directory):
        if not _installed(node_modules):
            began = time.monotonic()
            scratch = directory / ".build"
            shutil.rmtree(scratch, ignore_errors=True)  # of an install killed before it finished
            shutil.rmtree(node_modules, ignore_errors=True)
            scratch.mkdir()
            for name in ("package.json", "package-lock.json"):
                if (TS_SRC / name).exists():
                    shutil.copyfile(TS_SRC / name, scratch / name)
            try:
                done = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                    cwd=scratch,
                    env={**os.environ, "npm_config_update_notifier": "false"},
                    capture_output=True,
                    text=True,
                    timeout=INSTALL_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"npm install did not finish within {INSTALL_TIMEOUT:g} s") from exc
            if done.returncode != 0 or not _installed(scratch / "node_modules"):
                raise RuntimeError(f"npm install failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
            (scratch / "node_modules").rename(node_modules)
            shutil.rmtree(scratch)
            spent = round(time.monotonic() - began, 2)
    prune_stale(directory)
    return node_modules, spent


@pytest.fixture(scope="session")
def ts_client(workdir: Path) -> TSClient:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed to run the TypeScript MCP client (scripts/setup.sh --test installs them)")
    try:
        node_modules, spent = install_ts_client(npm)
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot install {SDK}@{SDK_VERSION} with npm: {exc}")
    # Node resolves the script's imports from its own directory: give this session's copy a node_modules.
    place = workdir / "ts"
    place.mkdir(exist_ok=True)
    shutil.copyfile(TS_SRC / "client.mjs", place / "client.mjs")
    link = place / "node_modules"
    if not link.is_symlink():
        link.symlink_to(node_modules)
    return TSClient(node=node, script=place / "client.mjs", install_seconds=spent)


@dataclass
class NodeRun:
    """A running ``client.mjs``: its stdout read as JSON events, its stderr kept in a file."""

    proc: asyncio.subprocess.Process
    stderr: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    def why(self) -> str:
        return f"events so far {self.events}; stderr:\n{self.stderr.read_text(errors='replace')[-3000:]}"

    async def event(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next event of the client, which must be ``kind``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(
                    f"no {kind!r} event from the node client within {timeout:g} s; {self.why()}"
                ) from None
            if not line:
                code = await self.proc.wait()
                raise AssertionError(f"the node client exited ({code}) before a {kind!r} event; {self.why()}")
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not one of ours (a library's console output)
            self.events.append(event)
            assert event["event"] == kind, f"expected a {kind!r} event; {self.why()}"
            return dict(event)

    async def exit_code(self, timeout: float = 10) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


@asynccontextmanager
async def node_client(ts: TSClient, url: str, name: str, timeout: float) -> AsyncIterator[NodeRun]:
    """``client.mjs url name timeout`` running; killed by its PID on the way out if it has not exited."""
    stderr = ts.script.parent / f"{name}.stderr"
    with open(stderr, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            ts.node, str(ts.script), url, name, f"{timeout:g}", stdout=asyncio.subprocess.PIPE, stderr=err
        )
    try:
        yield NodeRun(proc, stderr)
    finally:
        if proc.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_ts_client_sees_the_vm_and_hears_it_power_off(
    server: ServerProcess, tools: ToolClient, guest_isos: GuestISOs, vm_name: str, ts_client: TSClient
) -> None:
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="x86_64", memory="256M", vcpus=1, disk="size=16M",
        iso=str(guest_isos.amd64),
    )  # fmt: skip
    await tools.ok("manage_vm", name=vm_name, action="start")
    await tools.ok("vm_console", name=vm_name, action="wait", pattern=READY_MARKER, offset=0, timeout=BOOT)
    uri = f"vm://localhost/{vm_name}"
    async with node_client(ts_client, server.url, vm_name, timeout=BOOT) as client:
        ready = await client.event("ready", BOOT)
        assert re.fullmatch(r"2025-\d\d-\d\d", ready["protocol_version"]), ready["protocol_version"]
        assert ready["session"] and ready["resource_capabilities"] == {"subscribe": True, "listChanged": True}
        assert uri in ready["resources"] and ready["pages"] >= 1
        assert sorted(ready["templates"]) == [TEMPLATE, f"{TEMPLATE}/console", f"{TEMPLATE}/screen"]
        assert ready["mime_type"] == "application/json"
        vm = ready["vm"]
        assert (vm["name"], vm["status"], vm["uri"], vm["host"]) == (vm_name, "running", uri, "localhost")
        assert ready["console_mime_type"] == "text/plain" and READY_MARKER in ready["console"]
        assert vm_name in ready["completion"]["values"]
        assert ready["updates_before_ready"] == []

        await tools.ok("vm_console", name=vm_name, action="send", text="poweroff -f\n")
        sent = time.monotonic()
        updated = await client.event("updated", NOTIFIED)
        heard = time.monotonic() - sent
        assert updated["uri"] == uri and heard < NOTIFIED, (updated, heard)
        after = await client.event("after", 10)
        assert after["status"] == "stopped" and after["vm"]["name"] == vm_name
        assert await client.exit_code() == 0, client.why()
    await tools.ok("manage_vm", name=vm_name, action="delete", stop_timeout=QUICK)


async def test_ts_client_reading_a_missing_vm_fails_cleanly(server: ServerProcess, ts_client: TSClient) -> None:
    """The server answers the SDK's resources/read of an unknown VM with a JSON-RPC error; the client reports it
    (after listing and connecting fine) and exits 1 without hanging."""
    async with node_client(ts_client, server.url, "no-such-vm-ts", timeout=5) as client:
        failed = await client.event("error", 30)
        assert failed["stage"] == "read" and "no-such-vm-ts" in failed["message"], failed
        assert failed["code"] in (-32602, -32002), failed  # invalid params, or the 2025 spec's resource not found
        assert await client.exit_code() == 1
