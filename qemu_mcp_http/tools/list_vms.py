"""``list_vms``: the VMs of a host, filtered by status, arch and name."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ..context import AppContext
from ..targets import HostRequest
from ..vm.lifecycle import VMState
from ..vm.spec import parse_arch
from ._common import (
    HostArg,
    SshKeyArg,
    SshPortArg,
    SshPwdArg,
    SshUserArg,
    ToolResult,
    ToolSpec,
    VmDirArg,
    guarded,
)

__all__ = ["ANNOTATIONS", "DESCRIPTION", "TOOL", "list_vms"]

DESCRIPTION = """List the QEMU VMs of a host (local, or remote over SSH) with arch, vcpus, memory, disk and
status (running/stopped, from the QEMU process and its QMP socket), filtered by status, arch and a
case-insensitive name substring."""

ANNOTATIONS = ToolAnnotations(
    title="List QEMU VMs", read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


async def list_vms(
    ctx: Context[AppContext, Any],
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
    host: HostArg = "localhost",
    ssh_port: SshPortArg = 22,
    ssh_user: SshUserArg = None,
    ssh_pwd: SshPwdArg = None,
    ssh_key: SshKeyArg = None,
) -> Annotated[CallToolResult, ToolResult]:
    app = ctx.request_context.lifespan_context
    request = HostRequest(host, ssh_port, ssh_user, ssh_pwd, ssh_key)
    base: dict[str, Any] = {"host": request.display_name}

    async def work() -> tuple[str, dict[str, Any]]:
        wanted_arch = parse_arch(arch) if arch else None
        async with app.vms(request, vm_dir) as vms:
            listed, problems = await vms.list()
        # Every VM of the directory, before the filters: the metric is the directory's state, not this answer.
        app.metrics.record_vms(request.display_name, vms.vm_dir, (_metric_state(state) for _, state in listed))
        needle = (filter_name or "").lower()
        rows: list[dict[str, Any]] = []
        for definition, state in listed:
            if status != "all" and state.status != status:
                continue
            if wanted_arch and definition.arch != wanted_arch:
                continue
            if needle and needle not in definition.name.lower():
                continue
            rows.append(vms.row(definition, state))
        rows.sort(key=lambda row: row["name"])
        where = "locally" if request.is_local else f"on {request.display_name}"
        qualifier = "" if status == "all" else f"{status} "
        data: dict[str, Any] = {"vm_count": len(rows), "vms": rows}
        data.update(problems)
        message = f"Successfully obtained {len(rows)} {qualifier}VM{'s' if len(rows) != 1 else ''} {where}"
        if problems:
            n = sum(map(len, problems.values()))
            what = "entry that is not a usable VM" if n == 1 else "entries that are not usable VMs"
            message += (
                f"; {vms.vm_dir} also holds {n} {what} (see data.unreadable / data.incomplete; delete removes "
                "what an interrupted create made, or fix the definitions)"
            )
        return message, data

    return await guarded(work(), base)


def _metric_state(state: VMState) -> str:
    """``stopped``, or QMP's word for a live VM: running, paused, unresponsive, ..."""
    return (state.run_state or "running") if state.status == "running" else "stopped"


TOOL = ToolSpec("list_vms", list_vms, DESCRIPTION, ANNOTATIONS)
