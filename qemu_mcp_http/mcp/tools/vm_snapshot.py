"""``vm_snapshot``: save a VM before a risky change and go back, with or without its memory."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ...errors import InvalidInput
from ..confirm import Asking, Decision, NotAsked
from .call import Action, Call
from .params import VmDirArg
from .spec import ToolSpec

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

ActionName = Literal["create", "list", "revert", "delete"]


async def vm_snapshot(
    call: Call,
    name: Annotated[str, Field(description="Name of the VM")],
    action: Annotated[ActionName, Field(description="create, list, revert or delete")],
    snapshot: Annotated[
        str | None, Field(description="The snapshot's name (create: default snap-<UTC time>; revert/delete: required)")
    ] = None,
    memory: Annotated[
        bool | None, Field(description="create: save RAM and device state too (default: true if the VM runs)")
    ] = None,
    vm_dir: VmDirArg = None,
) -> CallToolResult:
    progress = call.progress(None)

    async def work() -> tuple[str, dict[str, Any]]:
        async with call.app.vms(call.request, vm_dir, name=name) as vms:
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

    base = call.base(vm_name=name, action=action)
    return await call.run(work(), base, vm=name, vm_dir=vm_dir, snapshot=snapshot)


async def confirm_revert(asking: Asking) -> Decision:
    name, snapshot = asking.arguments["name"], asking.arguments.get("snapshot")
    if snapshot is None:
        return NotAsked("not destructive")
    text = (
        f"Revert VM {name} {asking.where} to snapshot {snapshot}? What its disk (and, for a snapshot with memory, "
        "its running state) holds since then is lost."
    )
    return await asking.ask(f"revert of snapshot {snapshot}", text)


async def confirm_delete(asking: Asking) -> Decision:
    name, snapshot = asking.arguments["name"], asking.arguments.get("snapshot")
    if snapshot is None:
        return NotAsked("not destructive")
    text = f"Delete snapshot {snapshot} of VM {name} {asking.where}? It cannot be gone back to afterwards."
    return await asking.ask(f"delete of snapshot {snapshot}", text)


TOOL = ToolSpec(
    "vm_snapshot",
    vm_snapshot,
    DESCRIPTION,
    ANNOTATIONS,
    actions={
        "list": Action("read"),
        "create": Action("operate", audit="snapshot-create", changes="vm"),
        "revert": Action("operate", audit="snapshot-revert", confirm=confirm_revert, changes="vm"),
        "delete": Action("admin", audit="snapshot-delete", confirm=confirm_delete, changes="vm"),
    },
)
