"""Who may call, what they may touch, and the audit trail.

- :class:`StaticTokenVerifier`: bearer tokens from settings, compared in constant time, plugged into the
  ``mcp`` SDK's own auth middleware (401 without a valid token).
- :class:`HeaderGuard`: Host / Origin allow-lists (DNS rebinding, cross-origin pages).  The SDK's transport
  security matcher has no "any host" pattern, which a token-protected server on 0.0.0.0 behind a port
  mapping needs, so the check lives here.
- :func:`check_ssh_key`: an ``ssh_key`` must resolve under ``--ssh-key-dirs`` (other paths: :mod:`.vm.fence`).
- :class:`StreamLimiter`: concurrent ``monitor_vm_status`` calls per client and in all.
- :func:`audit`: one JSON line per state-changing action.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings, is_loopback
from ..errors import InvalidInput, LimitExceeded
from .grants import Grant, parse_grant_options

__all__ = [
    "SCOPE",
    "HeaderGuard",
    "StaticTokenVerifier",
    "StreamLimiter",
    "audit",
    "check_ssh_key",
    "client_identity",
    "derive_key",
    "load_shared_secret",
    "load_tokens",
]

SCOPE = "qemu"
audit_log = logging.getLogger("qemu_mcp_http.audit")


# -- tokens ---------------------------------------------------------------------------------------


def load_tokens(settings: Settings) -> dict[str, Grant]:
    """``{token: grant}`` from ``token`` (admin) and ``token_file``: lines ``token`` (admin) or
    ``client-id token [read|operate|admin] [hosts=a,b] [confirm=elicit|require|never]`` (see :mod:`.scopes`).

    :raise ValueError: the token file cannot be read, holds no token or a malformed line (the message names
        the line, never a token).
    """
    tokens: dict[str, Grant] = {}
    if settings.token:
        tokens[settings.token] = Grant("token-" + fingerprint(settings.token))
    if settings.token_file:
        try:
            with open(os.path.expanduser(settings.token_file), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read token file {settings.token_file}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) == 1:
                tokens[parts[0]] = Grant("token-" + fingerprint(parts[0]))
                continue
            try:
                tokens[parts[1]] = parse_grant_options(parts[0], parts[2:])
            except ValueError as exc:
                raise ValueError(f"token file {settings.token_file}, line {number}: {exc}") from None
        if not tokens:
            raise ValueError(f"token file {settings.token_file} holds no token")
    for token in tokens:
        if len(token) < 16:
            raise ValueError("a bearer token must be at least 16 characters long")
    return tokens


def load_shared_secret(settings: Settings) -> bytes | None:
    """The replicas' shared secret (``--shared-secret-file``), or ``None`` when none is set.

    :raise ValueError: the file cannot be read or holds fewer than 32 bytes (the message never shows it).
    """
    if not settings.shared_secret_file:
        return None
    try:
        with open(os.path.expanduser(settings.shared_secret_file), "rb") as f:
            secret = f.read(4096).strip()
    except OSError as exc:
        raise ValueError(f"cannot read shared secret file {settings.shared_secret_file}: {exc.strerror}") from None
    if len(secret) < 32:
        raise ValueError(
            f"shared secret file {settings.shared_secret_file} holds {len(secret)} bytes; give at least 32 "
            "(e.g. openssl rand -hex 32)"
        )
    return secret


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose from the shared secret (a leak of one key reveals nothing of the others)."""
    return hmac.new(secret, purpose.encode(), hashlib.sha256).digest()


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a secret, fit for logs."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


class StaticTokenVerifier:
    """The SDK's ``TokenVerifier`` over a fixed set of tokens; scopes ``qemu`` (any valid token) and what its
    grant includes (``read``, ``operate``, ``admin``)."""

    def __init__(self, tokens: Mapping[str, Grant]) -> None:
        self._tokens = [(t.encode(), grant) for t, grant in tokens.items()]

    async def verify_token(self, token: str) -> AccessToken | None:
        given = token.encode()
        found: Grant | None = None
        # Compare with every token, always: the time taken says nothing about which one nearly matched.
        for known, grant in self._tokens:
            if hmac.compare_digest(given, known):
                found = grant
        if found is None:
            return None
        return AccessToken(token=token, client_id=found.client_id, scopes=[SCOPE, *found.scopes])


# -- Host / Origin --------------------------------------------------------------------------------

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


def _matches(value: str, patterns: Sequence[str]) -> bool:
    """``*`` (anything), exact values, ``name:*`` (any port), ``*.example.com`` (subdomains); case-insensitive."""
    value = value.lower()
    for pattern in (p.lower() for p in patterns):
        if pattern == "*" or value == pattern:
            return True
        if pattern.endswith(":*"):
            base, _, port = value.rpartition(":")
            if port.isdigit() and _matches(base, [pattern[:-2]]):
                return True
        elif pattern.startswith("*.") and value.endswith(pattern[1:]):
            return True
    return False


class HeaderGuard:
    """ASGI middleware: 421 for an unknown Host, 403 for a foreign Origin (browsers always send one)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], allowed_origins: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.allowed_origins = tuple(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            origin = headers.get("origin")
            if not _matches(host, self.allowed_hosts):
                await PlainTextResponse("Invalid Host header", status_code=421)(scope, receive, send)
                return
            if origin is not None and not _matches(origin, self.allowed_origins):
                await PlainTextResponse("Invalid Origin header", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- paths ----------------------------------------------------------------------------------------


def check_ssh_key(settings: Settings, path: str) -> str:
    """An ``ssh_key`` names a file of this server: it must resolve under ``--ssh-key-dirs``.

    :raise InvalidInput: it does not.
    """
    if not path.startswith(("/", "~")):
        raise InvalidInput("ssh_key", f"{path!r} must be an absolute path")
    roots = tuple(posixpath.normpath(os.path.realpath(os.path.expanduser(p))) for p in settings.ssh_key_dirs)
    resolved = os.path.realpath(os.path.expanduser(path))
    if any(resolved == root or resolved.startswith(root.rstrip("/") + "/") for root in roots):
        return resolved
    raise InvalidInput(
        "ssh_key",
        f"{path!r} is outside the directories this server allows for keys ({', '.join(roots) or 'none'}); "
        "use a key under them or ask the operator to extend --ssh-key-dirs",
    )


# -- clients, limits, audit -----------------------------------------------------------------------


def client_identity(ctx: Context[Any, Any]) -> str:
    """The token's client id when authenticated, else the peer address."""
    token = get_access_token()
    if token is not None:
        return token.client_id
    request = getattr(ctx.request_context, "request", None)
    client = getattr(request, "client", None)
    return f"{client.host}" if client is not None else "unknown"


@dataclass
class StreamLimiter:
    """Counts concurrent monitor streams per client; limits come from settings at each call."""

    _active: dict[str, int] = field(default_factory=dict)

    @property
    def running(self) -> int:
        """Streams running now, all clients together."""
        return sum(self._active.values())

    @contextlib.contextmanager
    def slot(self, client: str, per_client: int, total: int) -> Iterator[None]:
        mine = self._active.get(client, 0)
        if mine >= per_client:
            raise LimitExceeded(
                f"client {client} already runs {mine} monitor_vm_status streams (limit {per_client}); "
                "cancel one or wait for it to finish"
            )
        if sum(self._active.values()) >= total:
            raise LimitExceeded(f"the server already runs {total} monitor streams (its limit); try again later")
        self._active[client] = mine + 1
        try:
            yield
        finally:
            self._active[client] -= 1
            if not self._active[client]:
                del self._active[client]


def audit(settings: Settings, **fields_: Any) -> None:
    """One line per state-changing action: time, client, host, VM, action, result.

    Synchronous on purpose: it runs in ``finally`` blocks of cancelled calls, where an ``await`` would be
    cancelled again; the file append is one small ``O_APPEND`` write.
    """
    record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **fields_}
    line = json.dumps(record, separators=(",", ":"), default=str)
    audit_log.info("%s", line)
    if settings.audit_log:
        try:
            _append(settings.audit_log, line + "\n")
        except OSError as exc:
            audit_log.error("cannot append to the audit log %s: %s", settings.audit_log, exc.strerror)


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
