"""``list_vms``: the VMs of a host, filtered by status, arch and name."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ...access.grants import current_grant
from ...errors import HostError, InvalidInput, QemuMcpError
from ...fleet.targets import HostRequest
from ...vm.manager import VMState
from ...vm.spec import VMDefinition, parse_arch
from ..context import AppContext
from .call import Action, Call
from .params import VmDirArg
from .spec import ToolSpec

__all__ = ["ANNOTATIONS", "DESCRIPTION", "MAX_LISTED_VMS", "TOOL", "list_vms"]

#: VMs one answer lists at most (the rest are counted, not listed): serializing an answer costs the event loop
#: time in proportion to its rows (~100 ms for 10,000), and a host decides how many VMs it holds.
MAX_LISTED_VMS = 10_000

DESCRIPTION = """List the QEMU VMs of a host (local, or remote over SSH) with arch, vcpus, memory, disk and
status (running/stopped, from the QEMU process and its QMP socket), filtered by status, arch and a
case-insensitive name substring. Without vm_dir, VMs created in other directories of the host are listed too
(each with its vm_dir). host='*' (every named host and this machine) or '@group' (a group of the hosts file)
asks them all at once: one flat list, each VM with its host, and data.hosts with each host's answer; progress
as each host answers."""

ANNOTATIONS = ToolAnnotations(
    title="List QEMU VMs", read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


async def list_vms(
    call: Call,
    status: Annotated[
        Literal["running", "stopped", "all"], Field(description="Only VMs in this state: running, stopped or all")
    ] = "all",
    arch: Annotated[
        Literal["x86_64", "arm64", "amd64", "aarch64"] | None,
        Field(description="Only VMs of this architecture: x86_64 (amd64) or arm64 (aarch64)"),
    ] = None,
    filter_name: Annotated[
        str | None, Field(description="Only VMs whose name contains this text (case-insensitive)")
    ] = None,
    vm_dir: VmDirArg = None,
) -> CallToolResult:
    app, request = call.app, call.request
    target = (request.host or "").strip()
    filters = _Filters(status, arch, filter_name)
    if target == "*" or target.startswith("@"):
        credentials = bool(request.ssh_user or request.ssh_pwd or request.ssh_key)
        return await call.run(_fleet(app, call.ctx, target, filters, vm_dir, credentials), {"host": target})

    async def work() -> tuple[str, dict[str, Any]]:
        rows, problems, vm_dir_used = await _list_host(app, request, vm_dir, filters)
        where = "locally" if request.is_local else f"on {request.display_name}"
        qualifier = "" if status == "all" else f"{status} "
        data: dict[str, Any] = {"vm_count": len(rows)}
        data["vms"] = _bounded(rows, data)
        data.update(problems)
        message = f"Successfully obtained {len(rows)} {qualifier}VM{'s' if len(rows) != 1 else ''} {where}"
        message += _cut_note(len(rows))
        broken = sum(len(v) for k, v in problems.items() if k in ("unreadable", "incomplete"))
        if broken:
            what = "entry that is not a usable VM" if broken == 1 else "entries that are not usable VMs"
            message += (
                f"; {vm_dir_used} also holds {broken} {what} (see data.unreadable / data.incomplete; delete removes "
                "what an interrupted create made, or fix the definitions)"
            )
        return message, data

    return await call.run(work(), call.base())


@dataclass(frozen=True)
class _Filters:
    status: str
    arch: str | None
    name: str | None

    def keep(self, definition: VMDefinition, state: VMState, wanted_arch: str | None) -> bool:
        if self.status != "all" and state.status != self.status:
            return False
        if wanted_arch and definition.arch != wanted_arch:
            return False
        return not self.name or self.name.lower() in definition.name.lower()


async def _list_host(
    app: AppContext, request: HostRequest, vm_dir: str | None, filters: _Filters
) -> tuple[list[dict[str, Any]], dict[str, list[str]], str]:
    """One host's VMs (rows as the spec shows them), sorted by name; without ``vm_dir`` also those the host's
    index places in other directories (each row then says its ``vm_dir``)."""
    wanted_arch = parse_arch(filters.arch) if filters.arch else None
    async with app.vms(request, vm_dir) as vms:
        listed, problems = await vms.list()
        elsewhere, unlisted = await vms.list_elsewhere() if vm_dir is None else ([], [])
    # Every VM of the directory, before the filters: the metric is the directory's state, not this answer.
    app.metrics.record_vms(request.display_name, vms.vm_dir, (_metric_state(state) for _, state in listed))
    rows = [vms.row(d, state) for d, state in listed if filters.keep(d, state, wanted_arch)]
    rows += [{**vms.row(d, state), "vm_dir": directory} for directory, d, state in elsewhere
             if filters.keep(d, state, wanted_arch)]  # fmt: skip
    rows.sort(key=lambda row: row["name"])
    found: dict[str, list[str]] = dict(problems)
    if unlisted:
        found["unlisted_vm_dirs"] = unlisted
    return rows, found, vms.vm_dir


async def _fleet(
    app: AppContext, ctx: Context[AppContext, Any], target: str, filters: _Filters, vm_dir: str | None,
    credentials: bool,
) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """Every host of ``*`` or ``@group`` at once: one flat list (each VM with its host) and each host's answer;
    a host that fails or is slow costs its timeout and fails nobody else."""
    if credentials:
        raise InvalidInput(
            "host", f"host={target!r} reaches the named hosts with their own settings; drop ssh_user/ssh_pwd/ssh_key"
        )
    grant = current_grant(app.grants)
    hosts = [h for h in app.fleet.expand(target) if grant.reaches(h)]
    if not hosts:
        raise InvalidInput("host", f"{target!r} names no host this server (and this token) may reach")
    limit = app.settings.ssh_connect_timeout + app.settings.command_timeout
    loop = asyncio.get_running_loop()
    answered = 0

    async def one(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        nonlocal answered
        began = loop.time()
        request = HostRequest() if name == "localhost" else HostRequest(host=name)
        rows: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(limit):
                rows, problems, _ = await _list_host(app, request, vm_dir, filters)
            summary: dict[str, Any] = {"success": True, "message": f"{len(rows)} VMs", "vm_count": len(rows)}
            summary.update(problems)
        except QemuMcpError as exc:
            summary = {"success": False, "message": exc.message, "vm_count": 0, "error": type(exc).__name__}
        except TimeoutError:
            summary = {"success": False, "message": f"no answer within {limit:g} s", "vm_count": 0,
                       "error": "OperationTimeout"}  # fmt: skip
        summary = {"host": name, **summary, "seconds": round(loop.time() - began, 3)}
        answered += 1
        with contextlib.suppress(Exception):  # a client gone away does not stop the others
            await ctx.report_progress(answered, len(hosts), json.dumps(summary, separators=(",", ":")))
        return [{**row, "host": name} for row in rows], summary

    outcomes = await asyncio.gather(*(one(h) for h in hosts))
    rows = [row for host_rows, _ in outcomes for row in host_rows]
    summaries = [summary for _, summary in outcomes]
    failed = [s["host"] for s in summaries if not s["success"]]
    if len(failed) == len(hosts):
        raise HostError(f"no host of {target!r} answered (see details.hosts)", {"hosts": summaries})
    message = f"Successfully obtained {len(rows)} VMs from {len(hosts) - len(failed)} of {len(hosts)} hosts"
    if failed:
        message += f"; no answer from {', '.join(failed)} (see data.hosts)"
    data: dict[str, Any] = {"vm_count": len(rows)}
    data["vms"] = _bounded(rows, data)
    return message + _cut_note(len(rows)), {**data, "hosts": summaries}


def _bounded(rows: list[dict[str, Any]], data: dict[str, Any]) -> list[dict[str, Any]]:
    """The first :data:`MAX_LISTED_VMS` rows; ``data["truncated"]`` says when there were more."""
    if len(rows) <= MAX_LISTED_VMS:
        return rows
    data["truncated"] = True
    return rows[:MAX_LISTED_VMS]


def _cut_note(count: int) -> str:
    if count <= MAX_LISTED_VMS:
        return ""
    return f"; the first {MAX_LISTED_VMS} are listed (data.truncated): narrow it with filter_name, status or arch"


def _metric_state(state: VMState) -> str:
    """``stopped``, or QMP's word for a live VM: running, paused, unresponsive, ..."""
    return (state.run_state or "running") if state.status == "running" else "stopped"


TOOL = ToolSpec("list_vms", list_vms, DESCRIPTION, ANNOTATIONS, actions={None: Action("read")})
