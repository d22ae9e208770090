"""The MCP server: the tools registered from an explicit list, every call logged and counted, and the
calls a tool never sees (unknown tools, unknown or malformed arguments) answered with the tools' envelope."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from mcp.server.auth.settings import AuthSettings
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer, RequestStateSecurity
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, InputRequiredResult, SubscribeRequestParams, UnsubscribeRequestParams
from mcp_types import Tool as MCPTool
from pydantic import AnyHttpUrl, ValidationError

from ..access.grants import Grant, current_grant
from ..access.secret import derive_key, load_shared_secret
from ..access.tokens import SCOPE, StaticTokenVerifier, load_tokens
from ..config import Settings
from ..console.links import ConsoleLinks
from ..fleet.bus import RedisSubscriptionBus
from ..fleet.changes import ChangeFeed, ScopedBus, VMFingerprint, Watcher
from ..fleet.targets import HostRequest
from ..observability import Metrics, tool_call
from ..version import __version__
from .calls import call_record, printable, settle
from .context import AppContext
from .resources import register_resources
from .scopes import refusal, tool_visible
from .tools import TOOLS
from .tools.envelope import envelope, validation_envelope
from .tools.spec import ToolSpec

__all__ = ["QemuMCPServer", "build_mcp"]


class QemuMCPServer(MCPServer[AppContext]):
    """MCPServer whose calls are logged and counted, and whose argument-validation failures use the tools'
    own ``{success: false}`` envelope."""

    metrics: Metrics
    #: The tools by name, as their specs declare them (replaced per instance by build_mcp).
    specs: dict[str, ToolSpec] = {}  # noqa: RUF012
    #: Bearer tokens and their grants (empty: no tokens, everything allowed).
    grants: dict[str, Grant] = {}  # noqa: RUF012  # replaced per instance by build_mcp

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[AppContext, Any] | None = None
    ) -> Any:
        # Here rather than in each tool: calls refused before a tool body runs (bad arguments) count too.
        # A name the server does not know is not a label: clients must not grow the metrics at will.
        tool = name if name in self.specs else "unknown"
        with tool_call(self.metrics, call_record(tool, arguments, context)) as record:
            refused = self.refuse_unknown(name, arguments) or self.refuse_out_of_scope(name, arguments)
            if refused is not None:
                settle(record, refused)
                return refused
            try:
                result = await super().call_tool(name, arguments, context)
            except ToolError as exc:
                if not isinstance(exc.__cause__, ValidationError):
                    raise
                spec = self.specs[name]
                result = validation_envelope(arguments, exc.__cause__, with_action=spec.names_action_when_invalid)
            if isinstance(result, CallToolResult):
                settle(record, result)
            elif isinstance(result, InputRequiredResult):
                record.outcome = "input_required"
            return result

    async def list_tools(self) -> list[MCPTool]:
        """The tools with at least one action within the caller's scope."""
        grant = current_grant(self.grants)
        return [tool for tool in await super().list_tools() if tool_visible(grant, tool.name)]

    def refuse_out_of_scope(self, name: str, arguments: dict[str, Any]) -> CallToolResult | None:
        """The envelope for a call outside the caller's token (scope or hosts); ``None`` when it is within."""
        why = refusal(current_grant(self.grants), name, arguments)
        if why is None:
            return None
        data: dict[str, Any] = {"host": str(arguments.get("host") or "localhost"), "error": "Forbidden"}
        if isinstance(arguments.get("name"), str):
            data["vm_name"] = arguments["name"]
        if isinstance(arguments.get("action"), str):
            data["action"] = arguments["action"]
        return envelope(False, why, data)

    def refuse_unknown(self, name: str, arguments: dict[str, Any]) -> CallToolResult | None:
        """The envelope for a tool this server does not have, or arguments a tool does not take (a misspelled
        ``memroy`` must not silently create a VM with the default memory); ``None`` when the call is fine."""
        tool = self._tool_manager.get_tool(name)
        data: dict[str, Any] = {"host": str(arguments.get("host") or "localhost"), "error": "InvalidInput"}
        if tool is None:
            known = ", ".join(sorted(self.specs))
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


def build_mcp(app_context: AppContext, tokens: dict[str, Grant] | None = None) -> QemuMCPServer:
    """The MCP server; ``tokens`` (``{token: grant}``, default: from the settings) guard it when not empty."""
    settings = app_context.settings
    tokens = load_tokens(settings) if tokens is None else tokens
    app_context.grants = tokens
    secret = load_shared_secret(settings)
    extra: dict[str, Any] = {}
    if secret is not None:
        # Any replica must open what another sealed (a multi-round call's state) or signed (console links).
        extra["request_state_security"] = RequestStateSecurity(keys=[derive_key(secret, "request-state")])
        app_context.console_links = ConsoleLinks(derive_key(secret, "console-links"))
    redis_bus = _watch_changes(app_context, tokens)
    feed = app_context.changes
    server = QemuMCPServer(
        name="qemu-mcp-http",
        version=__version__,
        instructions="Manage QEMU virtual machines on this host or on remote hosts over SSH. The VMs are also "
        "resources (vm://{host}/{name}, /console, /screen) with change notifications.",
        lifespan=_lifespan(app_context, redis_bus),
        subscriptions=ScopedBus(feed.bus, feed.reach),  # each listen stream hears only of its token's hosts
        middleware=[feed.listen_middleware, *([] if settings.stateless else [_advertise_list_changed])],
        **_auth(settings, tokens),
        **extra,
    )
    for spec in TOOLS:
        server.add_tool(spec.registered(), name=spec.name, description=spec.description, annotations=spec.annotations)
        tool = server._tool_manager.get_tool(spec.name)
        assert tool is not None
        tool.parameters["additionalProperties"] = False  # clients learn before calling that extras are refused
    server.metrics = app_context.metrics
    server.specs = {spec.name: spec for spec in TOOLS}
    server.grants = tokens
    if not settings.stateless:
        # Stateless, a 2025 session ends with each request: it could never be notified; without the handler,
        # such clients see resources.subscribe false instead of subscribing in vain.
        low = server._lowlevel_server
        low.add_request_handler("resources/subscribe", SubscribeRequestParams, feed.on_subscribe)
        low.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, feed.on_unsubscribe)
    register_resources(server, app_context, lambda: current_grant(tokens))
    return server


def _watch_changes(app_context: AppContext, tokens: dict[str, Grant]) -> RedisSubscriptionBus | None:
    """The change feed of the resources (over Redis with ``--redis-url``) and its watcher, set on
    ``app_context``; a listener hears only of the hosts its token reaches. Returns the Redis bus, if any."""
    settings = app_context.settings
    redis_bus = RedisSubscriptionBus(settings.redis_url) if settings.redis_url else None
    if redis_bus is not None:
        app_context.changes = ChangeFeed(redis_bus)
    feed = app_context.changes

    feed.reach = lambda: current_grant(tokens).hosts
    app_context.watcher = Watcher(
        feed,
        functools.partial(_fingerprints, app_context),
        app_context.fleet.names,
        local_interval=settings.watch_interval,
        remote_interval=settings.watch_remote_interval,
    )
    return redis_bus


def _lifespan(
    app_context: AppContext, redis_bus: RedisSubscriptionBus | None
) -> Callable[[MCPServer[AppContext]], AbstractAsyncContextManager[AppContext]]:
    """The MCP server's lifespan: the feed, its watcher and the Redis bus run while it serves; on the way out they
    stop, then the operations under way finish and the connections close (the VMs keep running)."""
    feed, watcher = app_context.changes, app_context.watcher
    assert watcher is not None

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[AppContext]) -> AsyncIterator[AppContext]:
        async with app_context:
            tasks = [
                asyncio.create_task(feed.run()),
                asyncio.create_task(watcher.run()),
                asyncio.create_task(app_context.metrics.sample_loop_lag()),
            ]
            if redis_bus is not None:
                tasks.append(asyncio.create_task(redis_bus.run()))
            try:
                yield app_context
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if redis_bus is not None:
                    await redis_bus.aclose()
                await app_context.shared.aclose()

    return lifespan


def _auth(settings: Settings, tokens: dict[str, Grant]) -> dict[str, Any]:
    """The SDK's bearer-token guard (401 without a valid token), when there are tokens."""
    if not tokens:
        return {}
    return {
        "token_verifier": StaticTokenVerifier(tokens),
        "auth": AuthSettings(
            issuer_url=AnyHttpUrl(f"http://{settings.host}:{settings.port}"),
            resource_server_url=None,
            required_scopes=[SCOPE],
        ),
    }


async def _fingerprints(app: AppContext, host: str) -> dict[str, VMFingerprint]:
    """What the watcher compares: each VM's definition, whether its QEMU runs, its pid (one scan, no QMP)."""
    request = HostRequest() if host == "localhost" else HostRequest(host=host)
    async with app.vms(request, None) as vms:
        scanned, _, _ = await vms.store.scan()
    return {
        d.name: (json.dumps(d.to_json(), sort_keys=True), facts.alive, facts.pid if facts.alive else None)
        for d, facts in scanned
    }


async def _advertise_list_changed(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Handshake revisions: say ``resources.listChanged`` (the SDK's HTTP manager gives no way to set it)."""
    result = await call_next(ctx)
    if ctx.method == "initialize" and isinstance(result, dict):
        capabilities = result.setdefault("capabilities", {})
        if isinstance(capabilities, dict):
            capabilities.setdefault("resources", {})["listChanged"] = True
    return result
