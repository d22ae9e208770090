"""The envelope every tool returns, and the parameters the tools share."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from ..context import AppContext
from ..errors import QemuMcpError

__all__ = [
    "HostArg",
    "SshKeyArg",
    "SshPortArg",
    "SshPwdArg",
    "SshUserArg",
    "ToolResult",
    "VmDirArg",
    "app_context",
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


def app_context(ctx: Context[Any, Any]) -> AppContext:
    lifespan = ctx.request_context.lifespan_context
    assert isinstance(lifespan, AppContext)
    return lifespan


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
        return envelope(False, exc.message, {**base, "error": type(exc).__name__})
    except Exception:
        log.exception("tool call failed unexpectedly (%s)", base)
        return envelope(False, "internal error in the server (logged); please report it", {**base, "error": "internal"})
    return envelope(True, message, {**base, **data})
