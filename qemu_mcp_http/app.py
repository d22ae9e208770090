"""The Starlette application: MCP streamable HTTP at ``/mcp``, ``GET /healthz``, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
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
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from . import __version__
from .config import Settings, is_loopback, parse_settings
from .context import AppContext
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
    """MCPServer whose argument-validation failures use the tools' own ``{success: false}`` envelope."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[AppContext, Any] | None = None
    ) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc.__cause__, ValidationError):
                raise
            return validation_envelope(name, arguments, exc.__cause__)


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


def build_mcp(app_context: AppContext) -> QemuMCPServer:
    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[AppContext]) -> AsyncIterator[AppContext]:
        async with app_context:
            try:
                yield app_context
            finally:
                await app_context.shared.aclose()

    settings = app_context.settings
    tokens = load_tokens(settings)
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
    for module in (manage_vm, list_vms, monitor_vm_status):
        fn = getattr(module, module.__name__.rsplit(".", 1)[1])
        server.add_tool(fn, description=module.DESCRIPTION, annotations=module.ANNOTATIONS)
    return server


def build_app(settings: Settings) -> Starlette:
    """The ASGI app: ``/mcp`` (streamable HTTP, SSE responses so progress reaches clients) and ``/healthz``."""
    app_context = AppContext(settings)
    mcp = build_mcp(app_context)
    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        host=settings.host,
        max_request_body_size=settings.max_request_bytes,
        # Host/Origin are checked by HeaderGuard for the whole app (see security.py).
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse(app_context.health())

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        app_context.shared.shutdown.bind(asyncio.get_running_loop())
        async with mcp.session_manager.run():
            log.info("qemu-mcp-http %s serving on http://%s:%d/mcp", __version__, settings.host, settings.port)
            yield

    routes = [Route("/healthz", healthz, methods=["GET"]), Mount("/", app=mcp_app)]
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
    try:
        settings = parse_settings(argv)
        app = build_app(settings)
    except ValueError as exc:
        print(f"qemu-mcp-http: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if settings.log_level != "DEBUG":
        # asyncssh logs every channel (with its command line) at INFO: noise for an operator.
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
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


class _Server(uvicorn.Server):
    """uvicorn's server, telling open-ended calls at SIGTERM/SIGINT, so they need not hold the graceful window."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
