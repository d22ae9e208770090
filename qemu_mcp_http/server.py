"""The MCP server: the tools registered from an explicit list, every call logged and counted, and the
calls a tool never sees (unknown tools, unknown or malformed arguments) answered with the tools' envelope."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult
from pydantic import AnyHttpUrl, ValidationError

from . import __version__
from .context import AppContext
from .observability import Metrics, call_record, printable, settle, tool_call
from .security import SCOPE, StaticTokenVerifier, load_tokens
from .tools import TOOLS
from .tools._common import envelope, validation_envelope

__all__ = ["QemuMCPServer", "build_mcp"]


class QemuMCPServer(MCPServer[AppContext]):
    """MCPServer whose calls are logged and counted, and whose argument-validation failures use the tools'
    own ``{success: false}`` envelope."""

    metrics: Metrics
    tool_names: frozenset[str] = frozenset()

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[AppContext, Any] | None = None
    ) -> Any:
        # Here rather than in each tool: calls refused before a tool body runs (bad arguments) count too.
        # A name the server does not know is not a label: clients must not grow the metrics at will.
        tool = name if name in self.tool_names else "unknown"
        with tool_call(self.metrics, call_record(tool, arguments, context)) as record:
            refused = self.refuse_unknown(name, arguments)
            if refused is not None:
                settle(record, refused)
                return refused
            try:
                result = await super().call_tool(name, arguments, context)
            except ToolError as exc:
                if not isinstance(exc.__cause__, ValidationError):
                    raise
                result = validation_envelope(name, arguments, exc.__cause__)
            if isinstance(result, CallToolResult):
                settle(record, result)
            return result

    def refuse_unknown(self, name: str, arguments: dict[str, Any]) -> CallToolResult | None:
        """The envelope for a tool this server does not have, or arguments a tool does not take (a misspelled
        ``memroy`` must not silently create a VM with the default memory); ``None`` when the call is fine."""
        tool = self._tool_manager.get_tool(name)
        data: dict[str, Any] = {"host": str(arguments.get("host") or "localhost"), "error": "InvalidInput"}
        if tool is None:
            known = ", ".join(sorted(self.tool_names))
            return envelope(False, f"Unknown tool {printable(name)!r}; this server's tools are: {known}", data)
        accepted = tool.parameters.get("properties", {})
        unknown = sorted(key for key in arguments if key not in accepted)
        if not unknown:
            return None
        if isinstance(arguments.get("name"), str):
            data["vm_name"] = arguments["name"]
        listed = ", ".join(repr(printable(key, 40)) for key in unknown[:10])
        return envelope(
            False,
            f"Unknown argument{'s' if len(unknown) != 1 else ''} {listed} for {name}; "
            f"it accepts: {', '.join(accepted)}",
            data,
        )


def build_mcp(app_context: AppContext, tokens: dict[str, str] | None = None) -> QemuMCPServer:
    """The MCP server; ``tokens`` (``{token: client_id}``, default: from the settings) guard it when not empty."""

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[AppContext]) -> AsyncIterator[AppContext]:
        async with app_context:
            try:
                yield app_context
            finally:
                await app_context.shared.aclose()

    settings = app_context.settings
    tokens = load_tokens(settings) if tokens is None else tokens
    auth: dict[str, Any] = {}
    if tokens:
        auth = {
            "token_verifier": StaticTokenVerifier(tokens),
            "auth": AuthSettings(
                issuer_url=AnyHttpUrl(f"http://{settings.host}:{settings.port}"),
                resource_server_url=None,
                required_scopes=[SCOPE],
            ),
        }
    server = QemuMCPServer(
        name="qemu-mcp-http",
        version=__version__,
        instructions="Manage QEMU virtual machines on this host or on remote hosts over SSH.",
        lifespan=lifespan,
        **auth,
    )
    for spec in TOOLS:
        server.add_tool(spec.fn, name=spec.name, description=spec.description, annotations=spec.annotations)
        tool = server._tool_manager.get_tool(spec.name)
        assert tool is not None
        tool.parameters["additionalProperties"] = False  # clients learn before calling that extras are refused
    server.metrics = app_context.metrics
    server.tool_names = frozenset(spec.name for spec in TOOLS)
    return server
