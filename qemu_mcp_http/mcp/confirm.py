"""Confirmation before destruction: the client's user is asked (MCP elicitation) before a delete, a modify
that restarts a running VM, a snapshot revert or delete, and a guest write_file.

Each such tool has a parameter filled by a resolver (the SDK's ``Resolve``): it runs before the tool body,
decides whether to ask, and returns an ``Elicit`` (the SDK asks: ``elicitation/create`` during the call on
the handshake revisions, an input-required result and a retry on 2026-07-28) or a :class:`NotAsked` that says
why not. The body then goes ahead only on :func:`refusal` ``None``. Nothing is held while the user thinks:
the resolver takes no lock, and the question names what will be destroyed as it is when asked.

The policy is ``--confirm`` (or a token's ``confirm=``): ``elicit`` asks clients that can and lets the others
go ahead, ``require`` refuses the others, ``never`` asks nobody.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from mcp.server.elicitation import AcceptedElicitation, ElicitationResult
from mcp.server.mcpserver import Context, Elicit, Resolve
from pydantic import BaseModel, Field

from ..access.grants import current_grant
from ..errors import QemuMcpError
from ..fleet.targets import HostRequest
from ..vm.manager import VMManager
from ..vm.spec import format_size, validate_name
from .context import AppContext

__all__ = [
    "Confirm",
    "GuestWriteConfirmation",
    "ManageConfirmation",
    "NotAsked",
    "SnapshotConfirmation",
    "refusal",
]

log = logging.getLogger(__name__)


class Confirm(BaseModel):
    """The form the user sees."""

    confirm: bool = Field(default=False, title="Confirm", description="Tick to go ahead")


@dataclass(frozen=True)
class NotAsked:
    """The resolver did not ask: ``why``; ``refuse`` is the message when the call must not go ahead."""

    why: str
    refuse: str | None = None


Decision = Elicit[Confirm] | NotAsked
RESTARTING = ("memory", "vcpus", "ports", "cloud_init")


def refusal(outcome: ElicitationResult[Any]) -> str | None:
    """``None``: go ahead; else the message of the refused call."""
    if not isinstance(outcome, AcceptedElicitation):
        return "cancelled by the user" if outcome.action == "cancel" else "declined by the user (nothing was changed)"
    answer = outcome.data
    if isinstance(answer, NotAsked):
        return answer.refuse
    if isinstance(answer, Confirm) and answer.confirm:
        return None
    return "not confirmed by the user (the box was not ticked; nothing was changed)"


def _can_ask(ctx: Context[Any, Any]) -> bool:
    capabilities = ctx.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    # A bare `elicitation: {}` (before modes existed) means forms; url-only clients cannot show ours.
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


async def _decide(ctx: Context[AppContext, Any], what: str, question: Callable[[], Awaitable[str]]) -> Decision:
    app = ctx.request_context.lifespan_context
    grant = current_grant(app.grants)
    policy = grant.confirm or app.settings.confirm
    if policy == "never":
        return NotAsked("confirmation is off")
    if not _can_ask(ctx):
        if policy == "require":
            return NotAsked(
                "client cannot ask",
                refuse=f"{what} must be confirmed by the user, and this client cannot ask (it did not declare the "
                "elicitation capability); use a client that can, or ask the operator for a token with confirm=never "
                "for automation",
            )
        return NotAsked("the client cannot ask its user")
    return Elicit(await question(), Confirm)


async def _with_vms(
    ctx: Context[AppContext, Any], request: HostRequest, vm_dir: str | None, name: str, fallback: str,
    describe: Callable[[VMManager], Awaitable[str]],
) -> str:  # fmt: skip
    """The question, with what the VM's files say; the plain ``fallback`` when they cannot be read (the
    call itself then says what is wrong)."""
    app = ctx.request_context.lifespan_context
    try:
        async with app.vms(request, vm_dir, name=name) as vms:
            return await describe(vms)
    except QemuMcpError:
        return fallback


def _where(request: HostRequest) -> str:
    return "on this server's host" if request.is_local else f"on host {request.display_name}"


async def confirm_manage_vm(
    ctx: Context[AppContext, Any],
    action: str,
    name: str,
    vm_dir: str | None,
    memory: str | None,
    vcpus: int | None,
    ports: list[str] | None,
    cloud_init: dict[str, Any] | None,
    host: str,
    ssh_port: int,
    ssh_user: str | None,
    ssh_pwd: str | None,
    ssh_key: str | None,
) -> Decision:
    request = HostRequest(host, ssh_port, ssh_user, ssh_pwd, ssh_key)
    where = _where(request)
    if action == "delete":

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
            return f"Delete VM {name} {where}? Its directory's files go and {fate}.{now} This cannot be undone."

        fallback = f"Delete VM {name} {where} and the disk it created? This cannot be undone."
        return await _decide(
            ctx, f"deleting VM {name}", lambda: _with_vms(ctx, request, vm_dir, name, fallback, deleting)
        )
    given = {"memory": memory, "vcpus": vcpus, "ports": ports, "cloud_init": cloud_init}
    restarting = [key for key in RESTARTING if given[key] is not None]
    if action != "modify" or not restarting:
        return NotAsked("not destructive")

    async def running() -> bool:
        app = ctx.request_context.lifespan_context
        try:
            async with app.vms(request, vm_dir, name=name) as vms:
                definition = await vms.store.load(validate_name(name))
                return (await vms.state_of(definition)).status == "running"
        except QemuMcpError:
            return False  # the call itself says what is wrong

    if not await running():
        return NotAsked("the VM is not running: nothing restarts")
    changes = ", ".join(restarting)
    text = (
        f"Modify VM {name} {where}: changing {changes} restarts the running VM (its guest is shut down and "
        "started again; unsaved work in it is lost). Go ahead?"
    )

    async def question() -> str:
        return text

    return await _decide(ctx, f"restarting VM {name}", question)


async def confirm_vm_snapshot(
    ctx: Context[AppContext, Any],
    action: str,
    name: str,
    snapshot: str | None,
    host: str,
    ssh_port: int,
    ssh_user: str | None,
    ssh_pwd: str | None,
    ssh_key: str | None,
) -> Decision:
    if action not in ("revert", "delete") or snapshot is None:
        return NotAsked("not destructive")
    where = _where(HostRequest(host, ssh_port, ssh_user, ssh_pwd, ssh_key))
    if action == "revert":
        text = (
            f"Revert VM {name} {where} to snapshot {snapshot}? What its disk (and, for a snapshot with memory, "
            "its running state) holds since then is lost."
        )
    else:
        text = f"Delete snapshot {snapshot} of VM {name} {where}? It cannot be gone back to afterwards."

    async def question() -> str:
        return text

    return await _decide(ctx, f"{action} of snapshot {snapshot}", question)


async def confirm_guest_write(
    ctx: Context[AppContext, Any],
    action: str,
    name: str,
    path: str | None,
    content: str | None,
    content_base64: str | None,
    append: bool,
    host: str,
    ssh_port: int,
    ssh_user: str | None,
    ssh_pwd: str | None,
    ssh_key: str | None,
) -> Decision:
    if action != "write_file" or path is None:
        return NotAsked("not destructive")
    where = _where(HostRequest(host, ssh_port, ssh_user, ssh_pwd, ssh_key))
    size = len(content.encode()) if content is not None else (len(content_base64 or "") * 3) // 4
    how = "append about" if append else "replace the file with about"
    text = f"Write to {path} in the guest of VM {name} {where} ({how} {size} bytes)? An existing file's content is "
    text += "kept and extended." if append else "lost."

    async def question() -> str:
        return text

    return await _decide(ctx, f"writing {path} in VM {name}", question)


ManageConfirmation = Annotated[ElicitationResult[Confirm], Resolve(confirm_manage_vm)]
SnapshotConfirmation = Annotated[ElicitationResult[Confirm], Resolve(confirm_vm_snapshot)]
GuestWriteConfirmation = Annotated[ElicitationResult[Confirm], Resolve(confirm_guest_write)]
