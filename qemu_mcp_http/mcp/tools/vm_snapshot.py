"""``vm_snapshot``: save a VM before a risky change and go back, with or without its memory."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ...errors import InvalidInput
from ...fleet.targets import HostRequest
from ..confirm import SnapshotConfirmation
from ..context import AppContext
from ._common import (
    Changed,
    HostArg,
    SshKeyArg,
    SshPortArg,
    SshPwdArg,
    SshUserArg,
    ToolResult,
    ToolSpec,
    VmDirArg,
    audited_change,
    guarded,
)

__all__ = ["ANNOTATIONS", "DESCRIPTION", "TOOL", "vm_snapshot"]

DESCRIPTION = """Internal snapshots of a VM's qcow2 disk (locally or over SSH). Actions: create (`snapshot`: a name,
default a timestamp; `memory`: also the RAM and device state, default true for a running VM), list (name, date,
VM clock, size of the saved memory; 0: disk only), revert (a stopped VM's disk; a running VM goes back to a
snapshot with memory and goes on from that moment; a disk-only snapshot needs the VM stopped), delete. Jobs of a
running VM report progress. Raw disks and attached disks are refused."""

ANNOTATIONS = ToolAnnotations(
    title="Snapshots of a VM", read_only_hint=False, destructive_hint=True, idempotent_hint=False,
    open_world_hint=False,
)  # fmt: skip

Action = Literal["create", "list", "revert", "delete"]


async def vm_snapshot(
    name: Annotated[str, Field(description="Name of the VM")],
    action: Annotated[Action, Field(description="create, list, revert or delete")],
    ctx: Context[AppContext, Any],
    confirmation: SnapshotConfirmation,
    snapshot: Annotated[
        str | None, Field(description="The snapshot's name (create: default snap-<UTC time>; revert/delete: required)")
    ] = None,
    memory: Annotated[
        bool | None, Field(description="create: save RAM and device state too (default: true if the VM runs)")
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
    base: dict[str, Any] = {"host": request.display_name, "vm_name": name, "action": action}

    async def progress(elapsed: float, phase: str) -> None:
        with contextlib.suppress(Exception):
            note = json.dumps({"phase": phase, "elapsed_s": round(elapsed, 1)}, separators=(",", ":"))
            await ctx.report_progress(round(elapsed, 1), None, note)

    async def work() -> tuple[str, dict[str, Any]]:
        async with app.vms(request, vm_dir, name=name) as vms:
            if action == "list":
                found = await vms.snapshot_list(name)
                return f"VM {name} has {len(found)} snapshot{'s' if len(found) != 1 else ''}", {"snapshots": found}
            if action == "create":
                made = await vms.snapshot_create(name, snapshot, memory, progress)
                what = "with its memory" if made["memory"] else "disk only"
                return f"snapshot {made['snapshot']} of VM {name} created ({what})", made
            if snapshot is None:
                raise InvalidInput("snapshot", f"{action} needs the snapshot's name; list shows them")
            if action == "revert":
                done = await vms.snapshot_revert(name, snapshot, progress)
                return f"VM {name} reverted to snapshot {snapshot}", done
            gone = await vms.snapshot_delete(name, snapshot, progress)
            return f"snapshot {snapshot} of VM {name} deleted", gone

    if action == "list":
        return await guarded(work(), base)
    where = app.fleet.resource_host(request, vm_dir)
    return await audited_change(
        app, ctx, work(), base, confirmation=confirmation, changed=Changed(where, name) if where else None,
        host=request.display_name, vm=name, action=f"snapshot-{action}", snapshot=snapshot,
    )  # fmt: skip


TOOL = ToolSpec("vm_snapshot", vm_snapshot, DESCRIPTION, ANNOTATIONS)
