"""``manage_vm``: create / start / stop / delete / modify a VM."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ...errors import InvalidInput
from ...fleet.targets import HostRequest
from ...vm.create import GuestAccess
from ..confirm import ManageConfirmation
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
)

__all__ = ["ANNOTATIONS", "DESCRIPTION", "TOOL", "manage_vm"]

Action = Literal["create", "start", "stop", "delete", "modify"]
ArchArg = Literal["x86_64", "arm64", "amd64", "aarch64"]

DESCRIPTION = """Full-lifecycle management of a QEMU VM on the local host or a remote host over SSH.
Actions: create (define the VM and make its disk, from an image if given, with cloud-init and port forwards;
does not start it), start (wait='agent' or 'ssh' returns once the guest is really up), stop (ACPI shutdown, pressed
again every few seconds, and the guest agent's shutdown when it answers; then QMP quit, then SIGKILL after
stop_timeout), delete (stops it; removes its directory's files and the disk the tool created),
modify (memory/vcpus restart a running VM; qcow2 disks can only grow; a change that fails is rolled back).
A call that has begun runs to its end even if the client goes away."""

ANNOTATIONS = ToolAnnotations(
    title="Manage a QEMU VM", read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
)


async def manage_vm(
    name: Annotated[str, Field(description="VM name, unique per host: [A-Za-z0-9][A-Za-z0-9._-]{0,62}")],
    action: Annotated[Action, Field(description="Operation: create, start, stop, delete or modify")],
    ctx: Context[AppContext, Any],
    confirmation: ManageConfirmation,
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
    image: Annotated[
        str | None,
        Field(
            description="create: a disk image on the host (a qcow2/raw cloud image under the allowed image dirs), or "
            "'vm:<name>' for the disk of a stopped VM of this vm_dir; the new disk is a linked clone of it (a qcow2 "
            "overlay, instant) or, with clone='full', a copy; disk size= grows it, the path part of disk places it"
        ),
    ] = None,
    clone: Annotated[
        Literal["linked", "full"], Field(description="create with image: linked (default, an overlay) or full (a copy)")
    ] = "linked",
    cloud_init: Annotated[
        dict[str, Any] | None,
        Field(
            description="create/modify: cloud-init settings written to a NoCloud seed ISO: {user, "
            "ssh_authorized_keys: [...], password (stored hashed), hostname, user_data (replaces the generated "
            "#cloud-config), network_config}, all optional"
        ),
    ] = None,
    ports: Annotated[
        list[str] | None,
        Field(
            description="create/modify: forwards from the VM's host to the guest: 'HOST:GUEST' (e.g. '2222:22'), "
            "'GUEST' (a free host port is chosen at start), '/udp' suffix; bound to the server's --forward-address "
            "(127.0.0.1) on the VM's host"
        ),
    ] = None,
    network: Annotated[
        str | None,
        Field(description="create: 'user' (default: NAT, allows ports), 'none', or 'bridge=<name>' (a host bridge)"),
    ] = None,
    wait: Annotated[
        Literal["running", "agent", "ssh"],
        Field(
            description="start: return once QEMU runs (running, default), once the guest agent answers (agent), "
            "or once the forwarded guest port 22 sends an SSH banner (ssh); progress is reported while waiting"
        ),
    ] = "running",
    wait_timeout: Annotated[
        float, Field(description="start: seconds to wait for agent/ssh (default 300)", gt=0, allow_inf_nan=False)
    ] = 300.0,
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
    app = ctx.request_context.lifespan_context
    request = HostRequest(host, ssh_port, ssh_user, ssh_pwd, ssh_key)
    base: dict[str, Any] = {"host": request.display_name, "vm_name": name, "action": action}

    grace = app.settings.stop_timeout if stop_timeout is None else stop_timeout

    async def waiting(elapsed: float, phase: str) -> None:
        with contextlib.suppress(Exception):  # a client gone away does not end the start
            note = json.dumps({"phase": phase, "elapsed_s": round(elapsed, 1)}, separators=(",", ":"))
            await ctx.report_progress(round(elapsed, 1), wait_timeout, note)

    async def work() -> tuple[str, dict[str, Any]]:
        async with app.vms(request, vm_dir, name=None if action == "create" else name) as vms:
            if action == "create":
                access = GuestAccess(image=image, clone=clone, cloud_init=cloud_init, ports=ports, network=network)
                details = await vms.create(name, arch, memory, vcpus, disk, iso, access)
                return f"VM {name} created successfully", {"details": details}
            if action == "start":
                message, details = await vms.start(name, wait, wait_timeout, waiting)
            elif action == "stop":
                message, details = await vms.stop(name, grace)
            elif action == "delete":
                details = await vms.delete(name, grace)
                message = f"VM {name} deleted"
            else:
                if network is not None or image is not None:
                    raise InvalidInput("modify", "network and image are set at create; delete and create the VM")
                message, details = await vms.modify(
                    name, memory, vcpus, disk, grace, ports=ports, cloud_init=cloud_init
                )
            return message, {"details": details}

    where = app.fleet.resource_host(request, vm_dir)
    changed = Changed(where, name, listed=action in ("create", "delete")) if where else None
    return await audited_change(
        app, ctx, work(), base, confirmation=confirmation, changed=changed, host=request.display_name, vm=name,
        action=action,
    )  # fmt: skip


TOOL = ToolSpec("manage_vm", manage_vm, DESCRIPTION, ANNOTATIONS)
