"""The VMs as MCP resources, with the real Python client on both protocol generations (the handshake revision
2025-11-25 and the stateless 2026-07-28): the paged list, templates, reads, completion, and change notifications
for changes the server makes and for changes it does not (a guest powering itself off, kill -9, a VM directory
appearing), with the watcher idle while nobody listens. The TypeScript client's view is tests/test_ts_client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from mcp.client import Client
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated
from mcp.shared.exceptions import MCPError
from mcp_types import (
    BlobResourceContents,
    ResourceListChangedNotification,
    ResourceTemplateReference,
    ResourceUpdatedNotification,
    TextResourceContents,
)

from .guest_image import READY_MARKER, GuestISOs
from .sshd import SSHServer
from .support import ServerProcess, ToolClient, open_tools, pid_of

MODES = ["legacy", "2026-07-28"]
FAKE_VMS = 129
EVENT_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def res_server(workdir: Path, sshd: SSHServer) -> Iterator[ServerProcess]:
    """A server of its own (a known set of VMs), with the test sshd as named host ``lab``."""
    vm_dir = workdir / "res-vms"
    vm_dir.mkdir()
    # lab's vm_dir is this module's own: other tests' VMs on the sshd stay out of the listings.
    lab_vms = sshd.root / "res-lab-vms"
    lab_vms.mkdir()
    shutil.chown(lab_vms, sshd.user, sshd.user)
    hosts = workdir / "res-hosts.json"
    hosts.write_text(
        json.dumps(
            {"lab": {"address": sshd.address, "port": sshd.port, "user": sshd.user, "key": str(sshd.key),
                     "vm_dir": str(lab_vms)}}
        )
    )  # fmt: skip
    with ServerProcess(
        vm_dir=vm_dir,  # its QEMUs are reaped from here at the end (never the session's other VMs)
        env={
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_ALLOWED_ROOTS": str(workdir),
            "QEMU_MCP_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
            "QEMU_MCP_SSH_KEY_DIRS": str(sshd.key_dir),
            "QEMU_MCP_SSH_HOSTS_FILE": str(hosts),
        },
    ) as srv:
        yield srv


def fake_vms(vm_dir: Path, model: str, count: int, prefix: str = "vm-") -> list[str]:
    """VM directories made by copying a real VM's definition under new names (listing reads definitions only)."""
    definition = json.loads((vm_dir / model / "vm.json").read_text())
    names = []
    for i in range(count):
        name = f"{prefix}{i:03d}"
        (vm_dir / name).mkdir()
        (vm_dir / name / "vm.json").write_text(json.dumps({**definition, "name": name}))
        names.append(name)
    return names


async def health(server: ServerProcess) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        answer: dict[str, Any] = (await http.get(f"http://127.0.0.1:{server.port}/healthz")).json()["resources"]
        return answer


@pytest.fixture(scope="module")
async def catalogue(res_server: ServerProcess, sshd: SSHServer) -> AsyncIterator[list[str]]:
    """130 local VMs (one real, the rest copies of its definition) and one on ``lab``."""
    async with open_tools(res_server.url) as tools:
        await tools.ok("manage_vm", name="alpha", action="create", arch="x86_64", memory="64M", disk="size=16M")
        await tools.ok("manage_vm", host="lab", name="rvm", action="create", arch="x86_64", memory="64M",
                       disk="size=16M")  # fmt: skip
        names = ["alpha", *fake_vms(res_server.vm_dir, "alpha", FAKE_VMS)]
        try:
            yield names
        finally:
            for name in names[1:]:
                shutil.rmtree(res_server.vm_dir / name, ignore_errors=True)
            await tools.call("manage_vm", name="alpha", action="delete")
            await tools.call("manage_vm", host="lab", name="rvm", action="delete")


@pytest.mark.parametrize("mode", MODES)
async def test_list_read_complete(res_server: ServerProcess, catalogue: list[str], mode: str) -> None:
    async with Client(res_server.url, mode=mode) as client:
        uris: list[str] = []
        pages = 0
        cursor: str | None = None
        while True:
            page = await client.list_resources(cursor=cursor)
            pages += 1
            assert len(page.resources) <= 100
            uris += [str(r.uri) for r in page.resources]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert pages == 2
        assert uris == [*sorted(f"vm://localhost/{n}" for n in catalogue), "vm://lab/rvm"]
        with pytest.raises(MCPError, match="invalid cursor"):
            await client.list_resources(cursor="12")

        templates = await client.list_resource_templates()
        assert sorted(t.uri_template for t in templates.resource_templates) == [
            "vm://{host}/{name}", "vm://{host}/{name}/console", "vm://{host}/{name}/screen",
        ]  # fmt: skip

        read = await client.read_resource("vm://localhost/alpha")
        (contents,) = read.contents
        assert isinstance(contents, TextResourceContents) and contents.mime_type == "application/json"
        vm = json.loads(contents.text)
        assert (vm["name"], vm["status"], vm["host"], vm["uri"]) == (
            "alpha",
            "stopped",
            "localhost",
            "vm://localhost/alpha",
        )
        assert vm["snapshots"] == [] and vm["console"] == {"uri": "vm://localhost/alpha/console", "next_offset": 0}
        remote = json.loads((await client.read_resource("vm://lab/rvm")).contents[0].text)  # type: ignore[union-attr]
        assert remote["host"] == "lab" and remote["vm_dir"].endswith("/res-lab-vms")
        console = (await client.read_resource("vm://localhost/alpha/console")).contents[0]
        assert isinstance(console, TextResourceContents) and console.text == ""
        for uri, words in (
            ("vm://localhost/alpha/screen", "not running"),
            ("vm://localhost/nope", "VM nope not found"),
            ("vm://elsewhere/alpha", "no host 'elsewhere'"),
            ("vm://localhost/-x", "not allowed"),
        ):
            with pytest.raises(MCPError, match=words):
                await client.read_resource(uri)

        template = ResourceTemplateReference(uri="vm://{host}/{name}")
        hosts = await client.complete(template, {"name": "host", "value": ""})
        assert hosts.completion.values == ["localhost", "lab"]
        some = await client.complete(template, {"name": "name", "value": "vm-1"}, {"host": "localhost"})
        assert some.completion.values == [f"vm-1{i:02d}" for i in range(29)] and some.completion.total == 29
        many = await client.complete(template, {"name": "name", "value": ""}, {"host": "localhost"})
        assert len(many.completion.values) == 100 and many.completion.has_more and many.completion.total == 130
        remote_names = await client.complete(template, {"name": "name", "value": "r"}, {"host": "lab"})
        assert remote_names.completion.values == ["rvm"]


@dataclass
class Heard:
    """What one client heard: (seconds since the test's clock start, event) pairs."""

    began: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.events.append((time.monotonic() - self.began, what))

    async def wait_for(self, what: str, after: float, timeout: float = EVENT_TIMEOUT) -> float:
        """Seconds from ``after`` (a time of this clock) until ``what`` was heard."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, seen in self.events:
                if seen == what and at >= after:
                    return at - after
            await asyncio.sleep(0.02)
        raise AssertionError(f"{what} not heard within {timeout} s; heard {self.events[-10:]}")

    def now(self) -> float:
        return time.monotonic() - self.began


@contextlib.asynccontextmanager
async def listeners(url: str, uri: str, heard_new: Heard, heard_old: Heard) -> AsyncIterator[None]:
    """A 2026-07-28 client on subscriptions/listen and a 2025-11-25 client with resources/subscribe."""

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            heard_old.add(f"updated {message.params.uri}")
        elif isinstance(message, ResourceListChangedNotification):
            heard_old.add("list_changed")

    async with (
        Client(url, mode="2026-07-28") as new,
        Client(url, mode="legacy", message_handler=on_message) as old,
        new.listen(resources_list_changed=True, resource_subscriptions=[uri]) as stream,
    ):
        await old.subscribe_resource(uri)

        async def read() -> None:
            async for event in stream:
                if isinstance(event, ResourceUpdated):
                    heard_new.add(f"updated {event.uri}")
                elif isinstance(event, ResourcesListChanged):
                    heard_new.add("list_changed")

        reader = asyncio.create_task(read())
        try:
            yield
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def test_changes_reach_both_client_generations(
    res_server: ServerProcess, guest_isos: GuestISOs, catalogue: list[str]
) -> None:
    """A guest that powers itself off, a QEMU killed with SIGKILL, a VM made by hand in the vm_dir, and the
    server's own start: each reaches a listen stream and a subscribed session."""
    name, uri = "watched", "vm://localhost/watched"
    async with open_tools(res_server.url) as tools:
        await tools.ok("manage_vm", name=name, action="create", arch="x86_64", memory="256M", vcpus=1,
                       disk="size=16M", iso=str(guest_isos.amd64))  # fmt: skip
        try:
            new, old = Heard(), Heard()
            async with listeners(res_server.url, uri, new, old):
                assert (await health(res_server))["subscribers"] == 2
                mark = new.now()
                await boot(tools, name)
                for heard in (new, old):  # the server's own change
                    await heard.wait_for(f"updated {uri}", mark)

                mark = new.now()
                await tools.ok("vm_console", name=name, action="send", text="poweroff -f\n")
                latency = [await heard.wait_for(f"updated {uri}", mark) for heard in (new, old)]
                assert (await tools.ok("list_vms", filter_name=name))["data"]["vms"][0]["status"] == "stopped"
                print(f"guest power-off heard after {latency[0]:.3f} s (2026) and {latency[1]:.3f} s (2025)")

                await boot(tools, name)
                mark = new.now()
                os.kill(pid_of(res_server.vm_dir, name), signal.SIGKILL)
                for heard in (new, old):
                    await heard.wait_for(f"updated {uri}", mark)

                mark = new.now()
                (made,) = fake_vms(res_server.vm_dir, "alpha", 1, prefix="by-hand-")
                for heard in (new, old):
                    await heard.wait_for("list_changed", mark)
                shutil.rmtree(res_server.vm_dir / made)
        finally:
            await tools.call("manage_vm", name=name, action="delete", stop_timeout=1)
    assert (await health(res_server))["subscribers"] == 0


async def boot(tools: ToolClient, name: str) -> None:
    end = (await tools.ok("vm_console", name=name, action="read", lines=1))["data"]["next_offset"]
    await tools.ok("manage_vm", name=name, action="start")
    ready = await tools.ok("vm_console", name=name, action="wait", pattern=READY_MARKER, offset=end, timeout=120)
    await tools.ok("vm_console", name=name, action="wait", pattern="guest# $", offset=ready["data"]["offset"])


async def test_watcher_idles_without_subscribers(res_server: ServerProcess, catalogue: list[str]) -> None:
    """No subscriber: no scan at all. One subscriber: scans. It leaves (2025: session end; 2026: stream end):
    idle again."""
    before = await health(res_server)
    await asyncio.sleep(2.5)
    idle = await health(res_server)
    assert idle["subscribers"] == 0 and idle["watcher_scans"] == before["watcher_scans"]
    for mode in MODES:
        async with Client(res_server.url, mode=mode) as client:
            if mode == "legacy":
                await client.subscribe_resource("vm://localhost/alpha")
                await asyncio.sleep(2.5)
                busy = await health(res_server)
            else:
                async with client.listen(resource_subscriptions=["vm://localhost/alpha"]):
                    await asyncio.sleep(2.5)
                    busy = await health(res_server)
            assert busy["subscribers"] == 1 and busy["watcher_scans"] >= idle["watcher_scans"] + 2, busy
        await asyncio.sleep(0.5)
        after = await health(res_server)
        await asyncio.sleep(2.5)
        assert after["subscribers"] == 0 and (await health(res_server))["watcher_scans"] == after["watcher_scans"]


async def test_screen_resource_of_a_running_vm(res_server: ServerProcess, guest_isos: GuestISOs) -> None:
    async with open_tools(res_server.url) as tools:
        await tools.ok("manage_vm", name="shown", action="create", arch="x86_64", memory="256M", vcpus=1,
                       disk="size=16M", iso=str(guest_isos.amd64))  # fmt: skip
        try:
            await boot(tools, "shown")
            async with Client(res_server.url) as client:
                vm = json.loads((await client.read_resource("vm://localhost/shown")).contents[0].text)  # type: ignore[union-attr]
                assert vm["status"] == "running" and vm["screen"] == {"uri": "vm://localhost/shown/screen"}
                assert vm["console"]["next_offset"] > 0
                (screen,) = (await client.read_resource("vm://localhost/shown/screen")).contents
                assert isinstance(screen, BlobResourceContents) and screen.mime_type == "image/png"
                console = (await client.read_resource("vm://localhost/shown/console")).contents[0]
                assert isinstance(console, TextResourceContents) and READY_MARKER in console.text
        finally:
            await tools.call("manage_vm", name="shown", action="delete", stop_timeout=1)
