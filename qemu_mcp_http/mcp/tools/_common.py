"""The envelope every tool returns, and the parameters the tools share."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from ...access.audit import audit
from ...access.grants import current_grant
from ...errors import QemuMcpError
from ..calls import client_identity
from ..confirm import refusal
from ..context import AppContext

__all__ = [
    "HostArg",
    "SshKeyArg",
    "SshPortArg",
    "SshPwdArg",
    "SshUserArg",
    "ToolResult",
    "VmDirArg",
    "Changed",
    "ToolSpec",
    "audited_change",
    "envelope",
    "guarded",
]

log = logging.getLogger("qemu_mcp_http.tools")


class ToolResult(BaseModel):
    """``{success, message, data}``, as the tool specification defines it."""

    success: bool = Field(description="whether the operation succeeded")
    message: str = Field(description="what happened, or what was wrong and how to fix it")
    data: dict[str, Any] = Field(description="operation data (host, vm_name, action, details, ...)")


HostArg = Annotated[str, Field(description="Remote host name or IP; omit (or 'localhost') for the local machine")]
SshPortArg = Annotated[int, Field(description="SSH port of the remote host", ge=1, le=65535)]
SshUserArg = Annotated[str | None, Field(description="SSH user name (required for remote operations)")]
SshPwdArg = Annotated[
    str | None,
    Field(
        description="SSH password (remote operations; ssh_key takes precedence)",
        json_schema_extra={"format": "password"},
    ),
]
SshKeyArg = Annotated[
    str | None, Field(description="Path of an SSH private key on the server (takes precedence over ssh_pwd)")
]
VmDirArg = Annotated[
    str | None, Field(description="VM storage directory on the host (default: the server's vm_dir, /var/lib/qemu)")
]


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the server registers it."""

    name: str
    fn: Callable[..., Awaitable[CallToolResult]]
    description: str
    annotations: ToolAnnotations


def envelope(success: bool, message: str, data: dict[str, Any]) -> CallToolResult:
    """The same ``{success, message, data}`` as text and as structured content."""
    result = ToolResult(success=success, message=message, data=data).model_dump(mode="json")
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(result, separators=(",", ":")))],
        structured_content=result,
        is_error=not success,
    )


async def guarded(work: Awaitable[tuple[str, dict[str, Any]]], base: dict[str, Any]) -> CallToolResult:
    """Run a tool body: our errors become ``success: false``; anything else is a logged bug."""
    try:
        message, data = await work
    except QemuMcpError as exc:
        failed = {**base, "error": type(exc).__name__}
        if exc.details:
            failed["details"] = exc.details
        return envelope(False, exc.message, failed)
    except Exception:
        log.exception("tool call failed unexpectedly (%s)", base)
        return envelope(False, "internal error in the server (logged); please report it", {**base, "error": "internal"})
    return envelope(True, message, {**base, **data})


@dataclass(frozen=True)
class Changed:
    """The VM resource a state-changing call touches (see :meth:`~qemu_mcp_http.fleet.hosts.Fleet.resource_host`)."""

    host: str
    name: str
    #: It appears or goes away (create, delete): the resource list changes too.
    listed: bool = False


async def audited_change(
    app: AppContext,
    ctx: Context[Any, Any],
    work: Coroutine[Any, Any, tuple[str, dict[str, Any]]],
    base: dict[str, Any],
    *,
    confirmation: ElicitationResult[Any] | None = None,
    changed: Changed | None = None,
    **audit_fields: Any,
) -> CallToolResult:
    """Run a state-changing tool body to its end, even if the client goes away meanwhile, and audit it.

    A VM half stopped because a client disconnected would help nobody: the work runs in a task of the
    server's (see :class:`..operations.Operations`); a cancelled call stops waiting for it, and the audit
    line, written when the work ends whatever happened, says ``client_gone``.

    ``confirmation``: the user's answer (see :mod:`..confirm`); a refusal runs nothing. ``changed``: the
    resource whose subscribers hear of the change once it succeeded.
    """
    client = client_identity(ctx)
    scope = current_grant(app.grants).scope
    refused = refusal(confirmation) if confirmation is not None else None
    if refused is not None:
        work.close()
        audit(app.settings, client=client, scope=scope, **audit_fields, success=False, result=refused)
        return envelope(False, refused, {**base, "error": "NotConfirmed"})
    gone = False

    async def body() -> CallToolResult:
        result: CallToolResult | None = None
        try:
            result = await guarded(work, base)
            if changed is not None and not result.is_error:
                await app.changes.vm_changed(changed.host, changed.name, listed=changed.listed)
            return result
        finally:
            outcome = (result.structured_content or {}) if result is not None else {}
            extra = {"client_gone": True} if gone else {}
            audit(
                app.settings,
                client=client,
                scope=scope,
                **audit_fields,
                success=bool(outcome.get("success")),
                result=outcome.get("message", "cancelled (the server is shutting down)"),
                **extra,
            )

    task = app.operations.detach(body())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        gone = True
        raise


def validation_envelope(tool: str, arguments: dict[str, Any], error: ValidationError) -> CallToolResult:
    problems = []
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"]) or "arguments"
        # err["msg"] states the accepted form; err["input"] is the caller's value and may be a secret.
        problems.append(f"Invalid '{field}': {err['msg']}")
    data: dict[str, Any] = {"host": str(arguments.get("host") or "localhost"), "error": "InvalidInput"}
    if isinstance(arguments.get("name"), str):
        data["vm_name"] = arguments["name"]
    if tool == "manage_vm" and isinstance(arguments.get("action"), str):
        data["action"] = arguments["action"]
    return envelope(False, "; ".join(problems), data)
