"""The Starlette application: MCP streamable HTTP at ``/mcp``, ``GET /healthz`` and ``GET /metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import platform
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .access.headers import HeaderGuard, default_allowed_hosts, default_allowed_origins
from .access.tokens import StaticTokenVerifier, load_tokens
from .config import Settings
from .console.vnc import open_vnc
from .errors import QemuMcpError
from .mcp.context import AppContext
from .mcp.server import build_mcp
from .observability import CONTENT_TYPE
from .version import __version__
from .web.console import console_routes

__all__ = ["build_app"]

log = logging.getLogger(__name__)


def build_app(settings: Settings) -> Starlette:
    """The ASGI app: ``/mcp`` (streamable HTTP, SSE responses so progress reaches clients), ``/healthz``
    (open, for health checks) and ``/metrics`` (Prometheus; behind the bearer token when one is set)."""
    app_context = AppContext(settings)
    tokens = load_tokens(settings)
    verifier = StaticTokenVerifier(tokens) if tokens else None
    mcp = build_mcp(app_context, tokens)
    mcp_app: ASGIApp = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        host=settings.host,
        max_request_body_size=settings.max_request_bytes,
        stateless_http=settings.stateless,
        # Host/Origin are checked by HeaderGuard for the whole app (see access/headers.py).
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    if settings.stateless:
        mcp_app = _no_standalone_stream(mcp_app)

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse(health(app_context))

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
        app_context.shutdown.bind(asyncio.get_running_loop())
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

    allowed_hosts, allowed_origins = default_allowed_hosts(settings), default_allowed_origins(settings)
    console = console_routes(
        app_context.console_links,
        functools.partial(open_vnc, app_context.fleet, timeout=settings.qmp_timeout),
        settings.novnc_dir,
        allowed_origins=allowed_origins,
        allowed_hosts=allowed_hosts,
    )
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *console,
        Mount("/", app=mcp_app),
    ]
    starlette = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(HeaderGuard, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)],
    )
    starlette.state.shutdown = app_context.shutdown
    return starlette


def health(app_context: AppContext) -> dict[str, Any]:
    """What ``GET /healthz`` answers: the version, the accelerator verdicts, the SSH pool and the resource watcher."""
    fleet = app_context.fleet
    watcher = app_context.watcher
    return {
        "status": "ok",
        "version": __version__,
        "vm_dir": app_context.settings.vm_dir,
        "accel_setting": app_context.settings.accel,
        "accel": app_context.shared.accel_probe.known(),
        "ssh": {**fleet.ssh.snapshot(), "named_hosts": sorted(fleet.named_hosts)},
        "resources": {
            "subscribers": app_context.changes.interest,
            "watcher_scans": watcher.scans if watcher is not None else 0,
        },
    }


def _no_standalone_stream(app: ASGIApp) -> ASGIApp:
    """Stateless, ``GET /mcp`` would open a server-to-client stream that nothing ever writes to and that never
    ends; 405 tells clients (the TypeScript SDK opens it) that there is none."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].rstrip("/") == "/mcp":
            response = PlainTextResponse("no standalone stream in stateless mode", status_code=405)
            response.headers["Allow"] = "POST, DELETE"
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return guarded


async def _probe_local_accel(app_context: AppContext) -> None:
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    if arch is None:
        return
    try:
        await app_context.shared.accel_probe.choose(
            app_context.fleet.local, arch, app_context.settings, tempfile.gettempdir()
        )
    except QemuMcpError as exc:
        log.warning("accelerator probe failed: %s", exc.message)
