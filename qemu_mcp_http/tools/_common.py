"""The envelope every tool returns, and the parameters the tools share."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from ..context import AppContext, HostRequest
from ..errors import InvalidInput, QemuMcpError
from ..hosts.base import Host
from ..security import PathPolicy
from ..vm.spec import parse_disk, validate_path

__all__ = [
    "HostArg",
    "SshKeyArg",
    "SshPortArg",
    "SshPwdArg",
    "SshUserArg",
    "ToolResult",
    "VmDirArg",
    "app_context",
    "check_paths",
    "check_remote_roots",
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


def check_paths(
    app: AppContext,
    request: HostRequest,
    vm_dir: str | None,
    disk: str | None = None,
    iso: str | None = None,
) -> None:
    """Refuse paths outside the allowed roots before anything happens.

    Local paths are resolved (symlinks, ``..``) and must lie under the allowed roots; on a remote host the
    SSH account's permissions are the boundary.  An ``ssh_key`` is a file of this server, so it is always checked.
    """
    policy = PathPolicy.from_settings(app.settings)
    if request.ssh_key and not request.is_local:
        policy.check_ssh_key(request.ssh_key)
    if not request.is_local:
        return
    if vm_dir is not None:
        policy.check_vm_dir(validate_path(vm_dir, "vm_dir"))
    disk_path = parse_disk(disk, max_disk_bytes=1 << 62).path if disk else None
    if disk_path is not None:
        policy.check_disk(disk_path)
    if iso is not None:
        policy.check_iso(validate_path(iso, "iso"))


async def check_remote_roots(
    app: AppContext,
    request: HostRequest,
    target: Host,
    vm_dir: str | None,
    disk: str | None = None,
    iso: str | None = None,
) -> None:
    """On a named host with ``allowed_roots``, refuse paths that resolve (on that host) outside them."""
    entry = None if request.is_local else app.named_hosts.get((request.host or "").strip())
    if entry is None or not entry.allowed_roots:
        return
    wanted = {"vm_dir": validate_path(vm_dir or app.settings.vm_dir, "vm_dir")}
    if disk and (disk_path := parse_disk(disk, max_disk_bytes=1 << 62).path):
        wanted["disk"] = disk_path
    if iso:
        wanted["iso"] = validate_path(iso, "iso")
    # One command resolves the roots and the paths alike (symlinks, ..), as the host sees them.
    argv = ["realpath", "-m", "--", *entry.allowed_roots, *wanted.values()]
    resolved = (await target.run(argv, timeout=app.settings.command_timeout)).stdout.splitlines()
    roots, paths = resolved[: len(entry.allowed_roots)], resolved[len(entry.allowed_roots) :]
    for (field_name, given), real in zip(wanted.items(), paths, strict=True):
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
            raise InvalidInput(
                field_name,
                f"{given} is outside the directories allowed on {request.host} "
                f"({', '.join(entry.allowed_roots)}); use a path under one of them",
            )
