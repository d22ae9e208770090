"""The web console for people: a noVNC page and a WebSocket that carries the VM's VNC stream.

Routes (from :func:`console_routes`; mount them before the catch-all ``/`` mount of the MCP app):

- ``GET /console/{host}/{vm}?token=...``: a small page of ours (``console.html``: nonce-based
  Content-Security-Policy, no referrer, never cached) that loads noVNC's ``core/rfb.js`` as an ES module and
  connects to
- ``WebSocket /console/{host}/{vm}/ws?token=...``: bytes pumped both ways between the browser and the VM's
  VNC unix socket (``<vm_dir>/<vm>/vnc.sock``), opened locally or through the pooled SSH connection's
  stream-local channel by the ``open_vnc`` callback;
- ``GET /console/static/{path}``: the files of the noVNC directory (Debian's ``novnc`` package, installed
  with the server: nothing is fetched at run time).

The token of a link (:mod:`qemu_mcp_http.console.links`: what it binds, how it is signed) is a bearer
capability while it lives: the page keeps it out of the ``Referer`` header and takes it out of the address bar
once loaded, and :func:`console_routes` has uvicorn's request log lines show ``token=[redacted]`` instead. The
expiry is checked when a connection opens; an open console stays open until either side closes it, or it
carries no byte for ``idle_timeout`` seconds.

Host and Origin are checked on the WebSocket as :class:`~qemu_mcp_http.access.headers.HeaderGuard` checks them
on HTTP requests (the same patterns): a page of another origin cannot open a console, even with a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import re
import secrets
import socket
import string
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..access.headers import header_problem
from ..console.links import ConsoleGrant, ConsoleLinks
from ..errors import QemuMcpError

__all__ = ["OpenVnc", "console_routes"]

log = logging.getLogger(__name__)

#: What opens the VNC stream of a granted console: a connected stream socket (through the host seam), either
#: awaited (the console closes it), or as an async context manager, held for as long as the console is open
#: (so that it can hold what the socket needs, e.g. a lease on a pooled SSH connection, which the pool
#: would otherwise close for idleness under an open console) and exited when the console closes.
OpenVnc = Callable[[ConsoleGrant], Awaitable[socket.socket] | AbstractAsyncContextManager[socket.socket]]

#: The largest read from the VNC socket, and so the largest WebSocket message sent to the browser.
_CHUNK = 64 * 1024
#: A WebSocket close reason is at most 123 bytes of UTF-8.
_MAX_REASON_BYTES = 123
#: Suffixes of the files ``/console/static`` serves, with their types: what noVNC's core needs, no HTML.
_STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_RFB_MODULE = "core/rfb.js"
#: Close codes (RFC 6455): normal, unsupported data, policy violation, server error.
_CLOSE_NORMAL, _CLOSE_UNSUPPORTED, _CLOSE_POLICY, _CLOSE_ERROR = 1000, 1003, 1008, 1011


_TOKEN_PARAM = re.compile(r"(token=)[^&\s\"']+")
#: The loggers where uvicorn writes request lines (``GET /console/...?token=...``, ``WebSocket ... [accepted]``).
_REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error")


class _RedactTokens(logging.Filter):
    """Replaces the value of every ``token=`` in a log record's message and arguments: request lines carry it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _TOKEN_PARAM.sub(r"\1[redacted]", record.msg)
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "token=" in a for a in record.args):
            record.args = tuple(_TOKEN_PARAM.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args)
        return True


def _redact_request_logs() -> None:
    for name in _REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactTokens) for f in logger.filters):
            logger.addFilter(_RedactTokens())


# -- the page -------------------------------------------------------------------------------------

#: The page: a template with ``$nonce``, ``$title`` and ``$label`` (HTML-escaped by the caller), read once.
_PAGE = string.Template((resources.files(__package__) / "console.html").read_text(encoding="utf-8"))


def _page_headers(nonce: str) -> dict[str, str]:
    csp = "; ".join(
        [
            "default-src 'none'",
            # Nonce only: the inline module and, through it, the modules it imports.
            f"script-src 'nonce-{nonce}'",
            f"style-src 'nonce-{nonce}'",
            # noVNC draws data: images (cursors, JPEG/PNG rectangles) and talks to its own WebSocket.
            "img-src 'self' data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": csp,
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
    }


def _refusal(status: int, text: str) -> PlainTextResponse:
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
    return PlainTextResponse(text, status_code=status, headers=headers)


_BAD_TOKEN = (
    "This console link is invalid or has expired (links last {ttl:g} s and open one VM's console only): "
    "ask for a new one (vm_console, action web)."
)


def _static_file(root: str, relative: str) -> tuple[str, str] | None:
    """``(path, media type)`` of the file ``relative`` of ``root``, resolved, when it lies inside ``root`` and
    is a regular file of a served type; else ``None`` (missing, outside, a directory, another type)."""
    try:
        base = Path(root).resolve(strict=True)
        path = (base / relative).resolve(strict=True)
    except (OSError, ValueError, RuntimeError):
        return None
    media_type = _STATIC_TYPES.get(path.suffix.lower())
    if media_type is None or not path.is_relative_to(base) or not path.is_file():
        return None
    return str(path), media_type


def _novnc_installed(root: str) -> bool:
    return os.path.isfile(os.path.join(root, _RFB_MODULE))


def _truncate_reason(text: str) -> str:
    data = text.encode()[:_MAX_REASON_BYTES]
    return data.decode(errors="ignore")


# -- the routes -----------------------------------------------------------------------------------


def console_routes(
    links: ConsoleLinks,
    open_vnc: OpenVnc,
    novnc_dir: str,
    *,
    allowed_origins: Sequence[str],
    allowed_hosts: Sequence[str],
    io_timeout: float = 30.0,
    idle_timeout: float = 1800.0,
) -> list[BaseRoute]:
    """The web console's routes (see the module's docstring).

    ``open_vnc`` gets a verified grant and gives a connected socket to the VM's VNC socket (see
    :data:`OpenVnc`: awaited, or an async context manager held while the console is open); it may raise
    :class:`~qemu_mcp_http.errors.QemuMcpError` (its message reaches the page as the close reason), and is
    given at most ``io_timeout`` seconds to open, as is every other wait but the one for traffic, which ends after
    ``idle_timeout`` seconds without a byte either way. ``allowed_origins`` and ``allowed_hosts`` take the
    patterns of :class:`~qemu_mcp_http.access.headers.HeaderGuard`. A missing noVNC directory is no error here:
    the page then answers 503 saying so (install Debian's ``novnc``), so the server runs without it. Installs
    a filter on uvicorn's request loggers that shows ``token=[redacted]`` (once per process).
    """
    _redact_request_logs()
    console = _Console(
        links, open_vnc, novnc_dir, tuple(allowed_origins), tuple(allowed_hosts), io_timeout, idle_timeout
    )
    return [
        Route("/console/static/{path:path}", console.static, methods=["GET", "HEAD"]),
        Route("/console/{host}/{vm}", console.page, methods=["GET", "HEAD"]),
        WebSocketRoute("/console/{host}/{vm}/ws", console.websocket),
    ]


@dataclass(frozen=True)
class _Console:
    """The handlers of :func:`console_routes` (its docstring says what each argument means)."""

    links: ConsoleLinks
    open_vnc: OpenVnc
    novnc_dir: str
    origins: tuple[str, ...]
    hosts: tuple[str, ...]
    io_timeout: float
    idle_timeout: float

    @property
    def bad_token(self) -> str:
        return _BAD_TOKEN.format(ttl=self.links.ttl)

    async def page(self, request: Request) -> Response:
        problem = header_problem(request.headers, self.hosts, self.origins)
        if problem is not None:
            return _refusal(421 if "Host" in problem else 403, problem)
        host, vm = request.path_params["host"], request.path_params["vm"]
        if self.links.verify(request.query_params.get("token", ""), host, vm) is None:
            return _refusal(403, self.bad_token)
        async with asyncio.timeout(self.io_timeout):
            installed = await asyncio.to_thread(_novnc_installed, self.novnc_dir)
        if not installed:
            log.error("web console: noVNC is not installed at %s (no %s)", self.novnc_dir, _RFB_MODULE)
            return _refusal(
                503,
                f"The web console is not available: noVNC is not installed on this server ({self.novnc_dir}); "
                "the operator can install Debian's novnc package or set the noVNC directory.",
            )
        nonce = secrets.token_urlsafe(18)
        # Names reach the page as HTML text and an attribute (escaped), never inside the script.
        label = html.escape(f"{vm} on {host}", quote=True)
        body = _PAGE.substitute(nonce=nonce, title=f"{label} - console", label=label)
        return HTMLResponse(body, headers=_page_headers(nonce))

    async def static(self, request: Request) -> Response:
        async with asyncio.timeout(self.io_timeout):
            found = await asyncio.to_thread(_static_file, self.novnc_dir, request.path_params["path"])
        if found is None:
            return _refusal(404, "Not found")
        path, media_type = found
        headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type=media_type, headers=headers)

    async def websocket(self, ws: WebSocket) -> None:
        """The VNC stream of a granted console; refused (with the reason as the close reason) otherwise."""
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "unknown"
        problem = header_problem(ws.headers, self.hosts, self.origins)
        if problem is not None:
            log.warning("web console: refused the WebSocket of %s: %s", peer, problem)
            # Refused before the handshake: the client gets an HTTP 403 (a browser shows no body of a refused
            # handshake anyway; and uvicorn's websockets-sansio logs a denial response as an error).
            async with asyncio.timeout(self.io_timeout):
                await ws.close(code=_CLOSE_POLICY, reason=problem)
            return
        host, vm = ws.path_params["host"], ws.path_params["vm"]
        subprotocol = "binary" if "binary" in ws.scope.get("subprotocols", ()) else None
        grant = self.links.verify(ws.query_params.get("token", ""), host, vm)
        async with asyncio.timeout(self.io_timeout):
            # Accept first, even to refuse: only an open WebSocket can tell the page why it closes.
            await ws.accept(subprotocol=subprotocol)
        if grant is None:
            log.warning("web console: refused the WebSocket of %s for %s on %s: bad or expired token", peer, vm, host)
            await _close(ws, _CLOSE_POLICY, self.bad_token, self.io_timeout)
            return
        code, reason = await self._serve(ws, grant, peer)
        await _close(ws, code, reason, self.io_timeout)

    async def _serve(self, ws: WebSocket, grant: ConsoleGrant, peer: str) -> tuple[int, str]:
        """Open the VM's VNC socket and pump it until a side closes; the close code and reason for the browser."""
        vm, host = grant.vm, grant.host
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(self.io_timeout):
                    opening = self.open_vnc(grant)
                    if isinstance(opening, AbstractAsyncContextManager):
                        sock = await stack.enter_async_context(opening)
                    else:
                        sock = await opening
            except TimeoutError:
                return _CLOSE_ERROR, f"the VNC socket of {vm} did not open in {self.io_timeout:g} s"
            except QemuMcpError as exc:
                log.warning("web console: cannot open the VNC socket of %s on %s: %s", vm, host, exc.message)
                return _CLOSE_ERROR, f"cannot reach the display of {vm}: {exc.message}"
            stack.callback(sock.close)
            log.info("web console: %s on %s opened for %s (%s)", vm, host, grant.client, peer)
            code, reason = _CLOSE_ERROR, "the console closed"
            try:
                code, reason = await _pump(ws, sock, self.io_timeout, self.idle_timeout)
            finally:
                log.info("web console: %s on %s closed for %s (%s): %s", vm, host, grant.client, peer, reason)
        return code, reason


async def _close(ws: WebSocket, code: int, reason: str, timeout: float) -> None:
    """Close ``ws`` with ``code`` and ``reason`` unless it is closed already; a peer gone meanwhile is fine."""
    if ws.application_state != WebSocketState.CONNECTED or ws.client_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(RuntimeError, OSError, TimeoutError, WebSocketDisconnect):
        async with asyncio.timeout(timeout):
            await ws.close(code=code, reason=_truncate_reason(reason))


async def _pump(ws: WebSocket, sock: socket.socket, io_timeout: float, idle_timeout: float) -> tuple[int, str]:
    """Carry bytes both ways until a side closes, a write stalls for ``io_timeout`` seconds or nothing moves
    for ``idle_timeout`` seconds; the close code and reason for the browser. Buffers are bounded: a chunk is
    read only once the previous one was written (asyncio's flow control on both transports)."""
    async with asyncio.timeout(io_timeout):
        reader, writer = await asyncio.open_connection(sock=sock, limit=_CHUNK)
    traffic = asyncio.Event()

    async def to_browser() -> tuple[int, str]:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return _CLOSE_NORMAL, "the VM's display closed (the VM stopped?)"
            traffic.set()
            async with asyncio.timeout(io_timeout):
                await ws.send_bytes(data)

    async def to_vm() -> tuple[int, str]:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return _CLOSE_NORMAL, "the browser closed the console"
            data = message.get("bytes")
            if data is None:
                return _CLOSE_UNSUPPORTED, "the console carries binary VNC messages only"
            traffic.set()
            writer.write(data)
            async with asyncio.timeout(io_timeout):
                await writer.drain()

    async def watchdog() -> tuple[int, str]:
        while True:
            traffic.clear()
            try:
                async with asyncio.timeout(idle_timeout):
                    await traffic.wait()
            except TimeoutError:
                return _CLOSE_NORMAL, f"closed after {idle_timeout:g} s without traffic"

    tasks = [asyncio.create_task(coro) for coro in (to_browser(), to_vm(), watchdog())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        try:
            return first.result()
        except TimeoutError:
            return _CLOSE_ERROR, f"the other side stopped reading for {io_timeout:g} s"
        except (OSError, WebSocketDisconnect, RuntimeError) as exc:
            return _CLOSE_ERROR, f"the connection failed: {type(exc).__name__}"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
