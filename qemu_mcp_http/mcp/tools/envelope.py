"""The envelope every tool returns: ``{success, message, data}``, as text and as structured content."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import Any

from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel, Field, ValidationError

from ...errors import QemuMcpError

__all__ = ["ToolResult", "envelope", "guarded", "validation_envelope"]

log = logging.getLogger("qemu_mcp_http.tools")


class ToolResult(BaseModel):
    """``{success, message, data}``, as the tool specification defines it."""

    success: bool = Field(description="whether the operation succeeded")
    message: str = Field(description="what happened, or what was wrong and how to fix it")
    data: dict[str, Any] = Field(description="operation data (host, vm_name, action, details, ...)")


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


def validation_envelope(arguments: dict[str, Any], error: ValidationError, *, with_action: bool) -> CallToolResult:
    """The answer to arguments the tool's input schema refused: each problem by its field (never the value given,
    which may be a secret); ``with_action``: the answer names the call's action (see ``ToolSpec``)."""
    problems = []
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"]) or "arguments"
        # err["msg"] states the accepted form; err["input"] is the caller's value and may be a secret.
        problems.append(f"Invalid '{field}': {err['msg']}")
    data: dict[str, Any] = {"host": str(arguments.get("host") or "localhost"), "error": "InvalidInput"}
    if isinstance(arguments.get("name"), str):
        data["vm_name"] = arguments["name"]
    if with_action and isinstance(arguments.get("action"), str):
        data["action"] = arguments["action"]
    return envelope(False, "; ".join(problems), data)
