"""The Starlette application: MCP streamable HTTP at ``/mcp``, ``GET /healthz``, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from types import FrameType
from typing import Any

import uvicorn
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult
from pydantic import AnyHttpUrl, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from . import __version__
from .check import run_checks
from .config import Settings, is_loopback, parse_invocation
from .context import AppContext
from .errors import QemuMcpError
from .observability import CONTENT_TYPE, CallRecord, Metrics, configure_logging, tool_call
from .security import (
    SCOPE,
    HeaderGuard,
    StaticTokenVerifier,
    default_allowed_hosts,
    default_allowed_origins,
    load_tokens,
)
from .tools import list_vms, manage_vm, monitor_vm_status
from .tools._common import envelope

__all__ = ["build_app", "build_mcp", "main"]

log = logging.getLogger(__name__)

#: Arguments never echoed back to a client or into a log line.
SECRET_ARGS = frozenset({"ssh_pwd"})


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


def call_record(name: str, arguments: dict[str, Any], context: Context[Any, Any] | None) -> CallRecord:
    """What the arguments say of the call (never a credential); the answer refines host and VM later."""
    try:
        request_id = context.request_id if context is not None else uuid.uuid4().hex
    except ValueError:  # a Context outside a request
        request_id = uuid.uuid4().hex
    host, user, vm, action = (arguments.get(key) for key in ("host", "ssh_user", "name", "action"))
    local = host in (None, "", "localhost") and not user
    return CallRecord(
        tool=name,
        request_id=printable(request_id),
        host="localhost" if local else printable(host),
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
    names = []
    for module in (manage_vm, list_vms, monitor_vm_status):
        names.append(module.__name__.rsplit(".", 1)[1])
        server.add_tool(getattr(module, names[-1]), description=module.DESCRIPTION, annotations=module.ANNOTATIONS)
        tool = server._tool_manager.get_tool(names[-1])
        assert tool is not None
        tool.parameters["additionalProperties"] = False  # clients learn before calling that extras are refused
    server.metrics = app_context.metrics
    server.tool_names = frozenset(names)
    return server


def build_app(settings: Settings) -> Starlette:
    """The ASGI app: ``/mcp`` (streamable HTTP, SSE responses so progress reaches clients), ``/healthz``
    (open, for health checks) and ``/metrics`` (Prometheus; behind the bearer token when one is set)."""
    app_context = AppContext(settings)
    tokens = load_tokens(settings)
    verifier = StaticTokenVerifier(tokens) if tokens else None
    mcp = build_mcp(app_context, tokens)
    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        host=settings.host,
        max_request_body_size=settings.max_request_bytes,
        # Host/Origin are checked by HeaderGuard for the whole app (see security.py).
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse(app_context.health())

    async def metrics(request: Request) -> Response:
        # Counts and host names are not secrets, but they map the estate: the same token as /mcp guards them.
        if verifier is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or await verifier.verify_token(token.strip()) is None:
                return PlainTextResponse(
                    "a bearer token is required", status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
        return Response(app_context.metrics.exposition(), media_type=CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        app_context.shared.shutdown.bind(asyncio.get_running_loop())
        # With accel=auto, learn at once whether KVM really runs guests here, so that /healthz and the
        # log say so before the first VM starts (which would otherwise wait for the probe).
        probe = asyncio.create_task(_probe_local_accel(app_context)) if settings.accel == "auto" else None
        try:
            async with mcp.session_manager.run():
                log.info("qemu-mcp-http %s serving on http://%s:%d/mcp", __version__, settings.host, settings.port)
                yield
        finally:
            if probe is not None:
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Mount("/", app=mcp_app),
    ]
    starlette = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(
                HeaderGuard,
                allowed_hosts=default_allowed_hosts(settings),
                allowed_origins=default_allowed_origins(settings),
            )
        ],
    )
    starlette.state.shutdown = app_context.shared.shutdown
    return starlette


def main(argv: Sequence[str] | None = None) -> int:
    """Serve; or, with ``--check``, report whether the server can run here (exit 0 usable, 1 not)."""
    invocation = parse_invocation(argv)  # --help, --version and malformed flags exit here
    if invocation.check:
        configure_logging("ERROR", "text")  # the report says it all; the probe's own lines would repeat it
        return run_checks(invocation, sys.stdout)
    try:
        settings = invocation.settings()
        app = build_app(settings)
    except ValueError as exc:
        print(f"qemu-mcp-http: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if not is_loopback(settings.host) and not (settings.token or settings.token_file):
        log.warning(
            "serving %s WITHOUT authentication (--allow-unauthenticated): anyone who can connect controls VMs",
            settings.host,
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
        log_config=None,  # one format for all loggers, set above
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it has handled gracefully
        _Server(config, on_exit=app.state.shutdown.trigger).run()
    return 0


async def _probe_local_accel(app_context: AppContext) -> None:
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    if arch is None:
        return
    try:
        await app_context.shared.accel_probe.choose(
            app_context.local, arch, app_context.settings, tempfile.gettempdir()
        )
    except QemuMcpError as exc:
        log.warning("accelerator probe failed: %s", exc.message)


class _Server(uvicorn.Server):
    """uvicorn's server, telling open-ended calls at SIGTERM/SIGINT, so they need not hold the graceful window."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
