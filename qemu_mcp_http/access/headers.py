"""Host / Origin allow-lists (DNS rebinding, cross-origin pages) for every HTTP request and WebSocket.

The SDK's transport security matcher has no "any host" pattern, which a token-protected server on 0.0.0.0 behind
a port mapping needs, so the check lives here; the web console applies the same patterns to its WebSocket.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings, is_loopback

__all__ = ["HeaderGuard", "default_allowed_hosts", "default_allowed_origins", "header_problem", "matches"]

_LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]")
_LOOPBACK_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")


def default_allowed_hosts(settings: Settings) -> tuple[str, ...]:
    if settings.allowed_hosts:
        return settings.allowed_hosts
    if settings.host in ("0.0.0.0", "::", ""):
        # Reached under any name (container port mappings, DNS): the token is the guard there.
        return ("*",)
    extra = () if is_loopback(settings.host) else (f"{settings.host}:*", settings.host)
    return _LOOPBACK_HOSTS + extra


def default_allowed_origins(settings: Settings) -> tuple[str, ...]:
    return settings.allowed_origins or _LOOPBACK_ORIGINS


def matches(value: str, patterns: Sequence[str]) -> bool:
    """``*`` (anything), exact values, ``name:*`` (any port), ``*.example.com`` (subdomains); case-insensitive."""
    value = value.lower()
    for pattern in (p.lower() for p in patterns):
        if pattern == "*" or value == pattern:
            return True
        if pattern.endswith(":*"):
            base, _, port = value.rpartition(":")
            if port.isdigit() and matches(base, [pattern[:-2]]):
                return True
        elif pattern.startswith("*.") and value.endswith(pattern[1:]):
            return True
    return False


def header_problem(headers: Headers, allowed_hosts: Sequence[str], allowed_origins: Sequence[str]) -> str | None:
    """What is wrong with a request's Host or Origin (``Invalid Host header``, ``Invalid Origin header``), or
    ``None``; a request without an Origin (not from a browser page) passes that check."""
    if not matches(headers.get("host", ""), allowed_hosts):
        return "Invalid Host header"
    origin = headers.get("origin")
    if origin is not None and not matches(origin, allowed_origins):
        return "Invalid Origin header"
    return None


class HeaderGuard:
    """ASGI middleware: 421 for an unknown Host, 403 for a foreign Origin (browsers always send one)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], allowed_origins: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.allowed_origins = tuple(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = header_problem(Headers(scope=scope), self.allowed_hosts, self.allowed_origins)
            if problem is not None:
                status = 421 if "Host" in problem else 403
                await PlainTextResponse(problem, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
