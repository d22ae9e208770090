"""``manage_vm``: create / start / stop / delete / modify a VM."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ..context import HostRequest
from ._common import (
    HostArg,
    SshKeyArg,
    SshPortArg,
    SshPwdArg,
    SshUserArg,
    ToolResult,
    VmDirArg,
    app_context,
    audited_change,
)

__all__ = ["ANNOTATIONS", "DESCRIPTION", "manage_vm"]

Action = Literal["create", "start", "stop", "delete", "modify"]
ArchArg = Literal["x86_64", "arm64", "amd64", "aarch64"]

DESCRIPTION = """Full-lifecycle management of a QEMU VM on the local host or a remote host over SSH.
Actions: create (define the VM and make its disk; does not start it), start, stop (ACPI shutdown, then quit,
then SIGKILL after stop_timeout), delete (stops it; removes its directory and the disks the tool created),
modify (memory/vcpus restart a running VM; qcow2 disks can only grow; a change that fails is rolled back).
A call that has begun runs to its end even if the client goes away."""

ANNOTATIONS = ToolAnnotations(
    title="Manage a QEMU VM", read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
)


async def manage_vm(
    name: Annotated[str, Field(description="VM name, unique per host: [A-Za-z0-9][A-Za-z0-9._-]{0,62}")],
    action: Annotated[Action, Field(description="Operation: create, start, stop, delete or modify")],
    ctx: Context[Any, Any],
    arch: Annotated[
        ArchArg | None, Field(description="CPU architecture, required for create: x86_64 (amd64) or arm64 (aarch64)")
    ] = None,
    memory: Annotated[
        str | None, Field(description="Memory for create/modify, e.g. 2G, 4096M, 512M (create default: 2G)")
    ] = None,
    disk: Annotated[
        str | None,
        Field(
            description="Disk for create/modify: 'path=/data/vm/disk.qcow2,size=20G[,format=raw]' "
            "(create default: <vm_dir>/<name>/<name>.qcow2, 20G, qcow2; modify: size= grows a qcow2 disk)"
        ),
    ] = None,
    iso: Annotated[str | None, Field(description="Boot ISO path on the host for create, e.g. /data/iso/x.iso")] = None,
    vcpus: Annotated[int | None, Field(description="Number of vCPUs for create/modify (create default: 2)")] = None,
    vm_dir: VmDirArg = None,
    stop_timeout: Annotated[
        float | None,
        Field(
            description="Seconds to wait for the guest's ACPI shutdown (stop, delete, modify) before QMP quit; "
            "default: the server's --stop-timeout (30 s)",
            ge=0,
            allow_inf_nan=False,
        ),
    ] = None,
    host: HostArg = "localhost",
    ssh_port: SshPortArg = 22,
    ssh_user: SshUserArg = None,
    ssh_pwd: SshPwdArg = None,
    ssh_key: SshKeyArg = None,
) -> Annotated[CallToolResult, ToolResult]:
    app = app_context(ctx)
    request = HostRequest(host, ssh_port, ssh_user, ssh_pwd, ssh_key)
    base: dict[str, Any] = {"host": request.display_name, "vm_name": name, "action": action}

    wait = app.settings.stop_timeout if stop_timeout is None else stop_timeout

    async def work() -> tuple[str, dict[str, Any]]:
        async with app.vms(request, vm_dir) as vms:
            if action == "create":
                details = await vms.create(name, arch, memory, vcpus, disk, iso)
                return f"VM {name} created successfully", {"details": details}
            if action == "start":
                message, details = await vms.start(name)
            elif action == "stop":
                message, details = await vms.stop(name, wait)
            elif action == "delete":
                details = await vms.delete(name, wait)
                message = f"VM {name} deleted"
            else:
                message, details = await vms.modify(name, memory, vcpus, disk, wait)
            return message, {"details": details}

    return await audited_change(app, ctx, work(), base, host=request.display_name, vm=name, action=action)
