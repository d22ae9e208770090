"""``manage_vm``: create / start / stop / delete / modify a VM."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from ...errors import InvalidInput
from ...vm.create import GuestAccess
from ...vm.manager import VMManager
from ...vm.spec import format_size, validate_name
from ..confirm import Asking, Decision, NotAsked
from .call import Action, Call
from .params import VmDirArg
from .spec import ToolSpec

__all__ = ["ANNOTATIONS", "DESCRIPTION", "TOOL", "manage_vm"]

ActionName = Literal["create", "start", "stop", "delete", "modify"]
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

Name = Annotated[str, Field(description="VM name, unique per host: [A-Za-z0-9][A-Za-z0-9._-]{0,62}")]
ActionParam = Annotated[ActionName, Field(description="Operation: create, start, stop, delete or modify")]
Arch = Annotated[
    ArchArg | None, Field(description="CPU architecture, required for create: x86_64 (amd64) or arm64 (aarch64)")
]
Memory = Annotated[str | None, Field(description="Memory for create/modify, e.g. 2G, 4096M, 512M (create default: 2G)")]
_DISK = (
    "Disk for create/modify: 'path=/data/vm/disk.qcow2,size=20G[,format=raw]' "
    "(create default: <vm_dir>/<name>/<name>.qcow2, 20G, qcow2; modify: size= grows a qcow2 disk)"
)
Disk = Annotated[str | None, Field(description=_DISK)]
Iso = Annotated[str | None, Field(description="Boot ISO path on the host for create, e.g. /data/iso/x.iso")]
Vcpus = Annotated[int | None, Field(description="Number of vCPUs for create/modify (create default: 2)")]
_IMAGE = (
    "create: a disk image on the host (a qcow2/raw cloud image under the allowed image dirs), or "
    "'vm:<name>' for the disk of a stopped VM of this vm_dir; the new disk is a linked clone of it (a qcow2 "
    "overlay, instant) or, with clone='full', a copy; disk size= grows it, the path part of disk places it"
)
Image = Annotated[str | None, Field(description=_IMAGE)]
Clone = Annotated[
    Literal["linked", "full"], Field(description="create with image: linked (default, an overlay) or full (a copy)")
]
_CLOUD_INIT = (
    "create/modify: cloud-init settings written to a NoCloud seed ISO: {user, "
    "ssh_authorized_keys: [...], password (stored hashed), hostname, user_data (replaces the generated "
    "#cloud-config), network_config}, all optional"
)
CloudInit = Annotated[dict[str, Any] | None, Field(description=_CLOUD_INIT)]
_PORTS = (
    "create/modify: forwards from the VM's host to the guest: 'HOST:GUEST' (e.g. '2222:22'), "
    "'GUEST' (a free host port is chosen at start), '/udp' suffix; bound to the server's --forward-address "
    "(127.0.0.1) on the VM's host"
)
Ports = Annotated[list[str] | None, Field(description=_PORTS)]
Network = Annotated[
    str | None,
    Field(description="create: 'user' (default: NAT, allows ports), 'none', or 'bridge=<name>' (a host bridge)"),
]
_WAIT = (
    "start: return once QEMU runs (running, default), once the guest agent answers (agent), "
    "or once the forwarded guest port 22 sends an SSH banner (ssh); progress is reported while waiting"
)
Wait = Annotated[Literal["running", "agent", "ssh"], Field(description=_WAIT)]
WaitTimeout = Annotated[
    float, Field(description="start: seconds to wait for agent/ssh (default 300)", gt=0, allow_inf_nan=False)
]
_STOP_TIMEOUT = (
    "Seconds to wait for the guest's ACPI shutdown (stop, delete, modify) before QMP quit; "
    "default: the server's --stop-timeout (30 s)"
)
StopTimeout = Annotated[float | None, Field(description=_STOP_TIMEOUT, ge=0, allow_inf_nan=False)]


async def manage_vm(
    call: Call,
    name: Name,
    action: ActionParam,
    arch: Arch = None,
    memory: Memory = None,
    disk: Disk = None,
    iso: Iso = None,
    vcpus: Vcpus = None,
    vm_dir: VmDirArg = None,
    image: Image = None,
    clone: Clone = "linked",
    cloud_init: CloudInit = None,
    ports: Ports = None,
    network: Network = None,
    wait: Wait = "running",
    wait_timeout: WaitTimeout = 300.0,
    stop_timeout: StopTimeout = None,
) -> CallToolResult:
    grace = call.app.settings.stop_timeout if stop_timeout is None else stop_timeout

    async def work() -> tuple[str, dict[str, Any]]:
        async with call.app.vms(call.request, vm_dir, name=None if action == "create" else name) as vms:
            if action == "create":
                access = GuestAccess(image=image, clone=clone, cloud_init=cloud_init, ports=ports, network=network)
                details = await vms.create(name, arch, memory, vcpus, disk, iso, access)
                return f"VM {name} created successfully", {"details": details}
            if action == "start":
                message, details = await vms.start(name, wait, wait_timeout, call.progress(wait_timeout))
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

    return await call.run(work(), call.base(vm_name=name, action=action), vm=name, vm_dir=vm_dir)


# -- what the user confirms -------------------------------------------------------------------------

#: The changes that restart a running VM.
RESTARTING = ("memory", "vcpus", "ports", "cloud_init")


async def confirm_delete(asking: Asking) -> Decision:
    """Delete: what goes (the directory's files, a disk create made) and whether the VM runs, as its files say."""
    name = str(asking.arguments["name"])

    async def deleting(vms: VMManager) -> str:
        definition = await vms.store.load(validate_name(name))
        running = (await vms.state_of(definition)).status == "running"
        disk = definition.disk
        fate = (
            f"its disk {disk.path} ({format_size(disk.size_bytes)}) is destroyed"
            if disk.created_by_tool
            else f"its disk {disk.path} was attached and is kept"
        )
        now = " It is running: it will be shut down first." if running else ""
        return f"Delete VM {name} {asking.where}? Its directory's files go and {fate}.{now} This cannot be undone."

    fallback = f"Delete VM {name} {asking.where} and the disk it created? This cannot be undone."
    return await asking.decide(f"deleting VM {name}", lambda: asking.about_vm(fallback, deleting))


async def confirm_restart(asking: Asking) -> Decision:
    """Modify: asked only when a change restarts the VM and the VM runs."""
    name = str(asking.arguments["name"])
    restarting = [key for key in RESTARTING if asking.arguments.get(key) is not None]
    if not restarting:
        return NotAsked("not destructive")

    async def running(vms: VMManager) -> str:
        definition = await vms.store.load(validate_name(name))
        return (await vms.state_of(definition)).status

    if await asking.about_vm("stopped", running) != "running":  # unreadable: the call itself says what is wrong
        return NotAsked("the VM is not running: nothing restarts")
    text = (
        f"Modify VM {name} {asking.where}: changing {', '.join(restarting)} restarts the running VM (its guest is "
        "shut down and started again; unsaved work in it is lost). Go ahead?"
    )
    return await asking.ask(f"restarting VM {name}", text)


TOOL = ToolSpec(
    "manage_vm",
    manage_vm,
    DESCRIPTION,
    ANNOTATIONS,
    actions={
        "create": Action("admin", audit="create", changes="listed"),
        "start": Action("operate", audit="start", changes="vm"),
        "stop": Action("operate", audit="stop", changes="vm"),
        "delete": Action("admin", audit="delete", confirm=confirm_delete, changes="listed"),
        "modify": Action("admin", audit="modify", confirm=confirm_restart, changes="vm"),
    },
    names_action_when_invalid=True,
)
