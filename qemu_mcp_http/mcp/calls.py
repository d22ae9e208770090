"""What is known of a tool call before and after it runs: who calls (the client, as the audit line and the limits
name it), and what its arguments and its answer say of it for the call's log line and metrics (never a
credential)."""

from __future__ import annotations

import uuid
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult

from ..fleet.targets import HostRequest
from ..observability import CallRecord

__all__ = ["call_record", "client_identity", "printable", "settle"]


def client_identity(ctx: Context[Any, Any]) -> str:
    """The token's client id when authenticated, else the peer address."""
    token = get_access_token()
    if token is not None:
        return token.client_id
    request = getattr(ctx.request_context, "request", None)
    client = getattr(request, "client", None)
    return f"{client.host}" if client is not None else "unknown"


def call_record(name: str, arguments: dict[str, Any], context: Context[Any, Any] | None) -> CallRecord:
    """What the arguments say of the call (never a credential); the answer refines host and VM later."""
    try:
        request_id = context.request_id if context is not None else uuid.uuid4().hex
    except ValueError:  # a Context outside a request
        request_id = uuid.uuid4().hex
    host, user, vm, action = (arguments.get(key) for key in ("host", "ssh_user", "name", "action"))
    request = HostRequest(
        host=host if isinstance(host, str) else None, ssh_user=user if isinstance(user, str) else None
    )
    return CallRecord(
        tool=name,
        request_id=printable(request_id),
        host="localhost" if request.is_local else printable(host),
        vm=printable(vm) if isinstance(vm, str) else None,
        action=printable(action) if isinstance(action, str) else None,
    )


def printable(value: object, limit: int = 100) -> str:
    """A client's value made safe for a text log line: one line, bounded (it has not been validated yet)."""
    text = str(value)
    return "".join(c if c.isprintable() else "?" for c in text[:limit]) + ("..." if len(text) > limit else "")


def settle(record: CallRecord, result: CallToolResult) -> None:
    """Outcome, host and VM from the tool's ``{success, message, data}`` answer."""
    data = (result.structured_content or {}).get("data")
    data = data if isinstance(data, dict) else {}
    record.host = printable(data.get("host", record.host))
    record.vm = printable(data["vm_name"]) if "vm_name" in data else record.vm
    if result.is_error:
        record.fail(str(data.get("error", "ToolError")))
