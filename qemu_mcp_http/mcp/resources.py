"""The VMs as MCP resources: ``vm://{host}/{name}`` (JSON), ``/console`` (text) and ``/screen`` (PNG).

``host`` is ``localhost`` or a named host of the hosts file: a URI never carries credentials, so hosts
given by address and password are not resources. The VMs are those of each host's default vm_dir.
``resources/list`` is paged (the SDK's own handler has no cursor) and bounded; completion (:mod:`.completions`)
offers hosts and VM names. A token limited to some hosts sees and reads only those.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    ListResourcesResult,
    PaginatedRequestParams,
    Resource,
)

from ..access.grants import Grant
from ..errors import InvalidInput, QemuMcpError, VMNotFound
from ..fleet.changes import vm_uri
from ..fleet.targets import HostRequest
from ..vm.manager import VMManager
from ..vm.spec import validate_name
from .completions import Completions
from .context import AppContext

__all__ = ["PAGE_SIZE", "MAX_LISTED", "VMResources", "register_resources"]

log = logging.getLogger(__name__)

#: Resources per page of resources/list, and at most this many in all (the rest is left out, and logged).
PAGE_SIZE = 100
MAX_LISTED = 10_000
#: Console lines in the console resource.
CONSOLE_LINES = 200
CURSOR_PREFIX = "vms:"


def register_resources(server: MCPServer[AppContext], app: AppContext, grant: Callable[[], Grant]) -> None:
    """Templates, the paged list and completion, on ``server``; ``grant()`` is the current caller's grant."""
    vms = VMResources(app, grant)
    for uri, name, title, description, mime_type, read in (
        (
            "vm://{host}/{name}/console",
            "vm_console",
            "Serial console of a VM",
            f"The last {CONSOLE_LINES} lines of the VM's serial console (escape sequences removed)",
            "text/plain",
            vms.console,
        ),
        ("vm://{host}/{name}/screen", "vm_screen", "Screen of a VM", "A PNG of the VM's screen (running VMs only)",
         "image/png", vms.screen),
        ("vm://{host}/{name}", "vm", "A VM",
         "The VM's definition and state as list_vms shows it, with its snapshots and console size",
         "application/json", vms.describe),
    ):  # fmt: skip
        server.resource(uri, name=name, title=title, description=description, mime_type=mime_type)(read)
    server._lowlevel_server.add_request_handler("resources/list", PaginatedRequestParams, vms.list_page)
    server.completion()(Completions(app, vms.reachable_hosts).complete)  # type: ignore[no-untyped-call]


class VMResources:
    """The ``vm://`` resources of the hosts the caller's grant reaches."""

    def __init__(self, app: AppContext, grant: Callable[[], Grant]) -> None:
        self.app = app
        self.grant = grant

    def reachable_hosts(self) -> list[str]:
        """``localhost`` and the named hosts the caller may reach."""
        caller = self.grant()
        return [h for h in self.app.fleet.names() if caller.reaches(h)]

    def request_for(self, host: str) -> HostRequest:
        """:raise ResourceNotFoundError: not a host of the resources, or not one the caller may reach."""
        if not host or host not in self.reachable_hosts():
            raise ResourceNotFoundError(
                f"no host {host!r} here: resources cover localhost and the named hosts "
                f"({', '.join(self.reachable_hosts())})"
            )
        return HostRequest() if host == "localhost" else HostRequest(host=host)

    async def _with_vms(self, host: str, name: str, work: Callable[[VMManager, str], Awaitable[Any]]) -> Any:
        request = self.request_for(host)
        try:
            vm = validate_name(name)
            async with self.app.vms(request, None, name=vm) as vms:
                return await work(vms, vm)
        except (VMNotFound, InvalidInput) as exc:
            raise ResourceNotFoundError(exc.message) from exc
        except QemuMcpError as exc:
            raise ResourceError(exc.message) from exc

    async def console(self, host: str, name: str) -> str:
        async def read(vms: VMManager, vm: str) -> str:
            text: str = (await vms.console_read(vm, CONSOLE_LINES, None, False))["text"]
            return text

        result: str = await self._with_vms(host, name, read)
        return result

    async def screen(self, host: str, name: str) -> bytes:
        async def shot(vms: VMManager, vm: str) -> bytes:
            _, png = await vms.console_screenshot(vm)
            return png

        result: bytes = await self._with_vms(host, name, shot)
        return result

    async def describe(self, host: str, name: str) -> str:
        async def row(vms: VMManager, vm: str) -> dict[str, Any]:
            return await _vm_row(vms, host, vm)

        return json.dumps(await self._with_vms(host, name, row), separators=(",", ":"))

    async def list_page(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> ListResourcesResult:
        """``resources/list``, a page of :data:`PAGE_SIZE` at a time."""
        cursor = params.cursor if params is not None else None
        start = _parse_cursor(cursor)
        everything = await _catalogue(self.app, self.reachable_hosts())
        if start > len(everything):
            raise MCPError(code=INVALID_PARAMS, message="the cursor is past the end of the list; list again")
        page = everything[start : start + PAGE_SIZE]
        end = start + len(page)
        return ListResourcesResult(
            resources=page, next_cursor=f"{CURSOR_PREFIX}{end}" if end < len(everything) else None
        )


async def _vm_row(vms: VMManager, host: str, vm: str) -> dict[str, Any]:
    """The VM's resource: its list_vms row, its snapshots, the size of its console log, and its other views."""
    definition = await vms.store.load(vm)
    state = await vms.state_of(definition)
    row = vms.row(definition, state)
    row.update(host=host, vm_dir=vms.vm_dir, uri=vm_uri(host, vm))
    disk = definition.disk
    if disk.format == "qcow2" and disk.created_by_tool:
        try:
            snapshots, _ = await vms.disk_snapshots(definition, state.status == "running")
            row["snapshots"] = snapshots
        except QemuMcpError as exc:
            row["snapshots_error"] = exc.message
    log_path = vms.store.paths(vm).console_log
    _, size = await vms.host.read_range(log_path, offset=None, length=0, timeout=vms.settings.command_timeout)
    row["console"] = {"uri": vm_uri(host, vm, "/console"), "next_offset": size}
    if state.status == "running":
        row["screen"] = {"uri": vm_uri(host, vm, "/screen")}
    return row


def _parse_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    number = cursor.removeprefix(CURSOR_PREFIX)
    if not cursor.startswith(CURSOR_PREFIX) or not number.isdigit() or len(number) > 9:
        raise MCPError(code=INVALID_PARAMS, message="invalid cursor: pass next_cursor of the previous page as it is")
    return int(number)


async def _catalogue(app: AppContext, hosts: list[str]) -> list[Resource]:
    """Every VM resource of ``hosts``, in host then name order; an unreachable host is left out (logged)."""

    async def of(host: str) -> list[Resource]:
        request = HostRequest() if host == "localhost" else HostRequest(host=host)
        try:
            async with app.vms(request, None) as vms:
                scanned, _, _ = await vms.store.scan()
        except QemuMcpError as exc:
            log.warning("resources/list: host %s left out: %s", host, exc.message)
            return []
        return [
            Resource(
                uri=vm_uri(host, d.name),
                name=f"{host}/{d.name}",
                title=f"VM {d.name} on {host}",
                description=f"{d.arch}, {d.summary()['memory']}, {d.vcpus} vCPU, "
                + ("running" if facts.alive else "stopped"),
                mime_type="application/json",
            )
            for d, facts in sorted(scanned, key=lambda pair: pair[0].name)
        ]

    found: list[Resource] = []
    for resources in await asyncio.gather(*(of(h) for h in hosts)):
        found.extend(resources)
    if len(found) > MAX_LISTED:
        log.warning("resources/list: %d VMs, only the first %d are listed", len(found), MAX_LISTED)
    return found[:MAX_LISTED]
