"""Signed links to a VM's web console: the token a link carries, and what it binds.

**Why a signed URL.** ``/mcp`` wants ``Authorization: Bearer``, but a browser cannot put a header on a
WebSocket handshake, nor on a page it navigates to. So an authenticated MCP call (``vm_console`` action
``web``) asks :meth:`ConsoleLinks.sign` for a token and answers a URL that carries it: the token is the
credential of the page and of its WebSocket (:mod:`qemu_mcp_http.web.console`), and the bearer token never
goes into a URL.

**What the token binds.** An HMAC-SHA256, under a secret of the server's process (or one derived from the
replicas' shared secret), over the host name (``localhost`` or a named host of the server's settings: no SSH
credential is in it, nor needed), the VM, its ``vm_dir``, the MCP client it was issued to (for the log) and an
expiry (:attr:`ConsoleLinks.ttl`, 120 s by default). A token opens only the console of that VM on that host,
until it expires; it is checked in constant time, and a token of another server process (another secret) or a
tampered one is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..errors import InvalidInput

__all__ = ["ConsoleGrant", "ConsoleLinks", "console_path"]

_TOKEN_VERSION = 1
_MAC_CONTEXT = b"qemu-mcp-http web console v1\x00"
#: No token the server signs is near this long; longer input is refused before any decoding.
_MAX_TOKEN_CHARS = 4096


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """:raise ValueError: not URL-safe base64."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class ConsoleGrant:
    """What a valid console token allows: the console of ``vm`` (in ``vm_dir``) on ``host``, until ``expires``
    (a Unix time); ``client`` is the MCP client it was issued to."""

    host: str
    vm: str
    vm_dir: str
    client: str
    expires: float


class ConsoleLinks:
    """Signs and verifies console tokens: HMAC-SHA256 under ``secret`` (at least 16 bytes; a random one per
    server process is right: links then die with the process), valid for ``ttl`` seconds.

    :raise ValueError: the secret is shorter than 16 bytes, or ``ttl`` is not a number of seconds from 1 ms
        to a day.
    """

    def __init__(self, secret: bytes, ttl: float = 120.0, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("the console link secret must be at least 16 bytes long")
        if not (math.isfinite(ttl) and 0.001 <= ttl <= 86400):
            raise ValueError(f"the console link lifetime must be from 0.001 to 86400 s, not {ttl!r}")
        self._secret = secret
        self.ttl = ttl
        self._clock = clock

    def _mac(self, body: str) -> str:
        return _b64encode(hmac.new(self._secret, _MAC_CONTEXT + body.encode("ascii"), hashlib.sha256).digest())

    def sign(self, host: str, vm: str, vm_dir: str, client: str) -> str:
        """An opaque, URL-safe token for the console of ``vm`` on ``host``, valid for :attr:`ttl` seconds.

        :raise InvalidInput: ``host`` or ``vm`` cannot be a path segment of the console URL (empty, holds
            ``/``, or is ``.``, ``..`` or, for the host, ``static``).
        """
        for field, value in (("host", host), ("vm", vm)):
            if not value or "/" in value or value in (".", "..") or (field == "host" and value == "static"):
                raise InvalidInput(field, f"{value!r} cannot name a web console (a path segment of its URL)")
        expires = round(self._clock() + self.ttl, 3)
        payload = json.dumps([_TOKEN_VERSION, host, vm, vm_dir, client, expires], separators=(",", ":"))
        body = _b64encode(payload.encode())
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str, host: str, vm: str) -> ConsoleGrant | None:
        """The grant of ``token`` when it is authentic, unexpired and for ``vm`` on ``host``; else ``None``."""
        if not token or len(token) > _MAX_TOKEN_CHARS or not token.isascii():
            return None
        body, sep, mac = token.partition(".")
        if not sep or not hmac.compare_digest(mac.encode("ascii"), self._mac(body).encode("ascii")):
            return None
        try:
            fields: Any = json.loads(_b64decode(body))
        except (ValueError, binascii.Error):
            return None
        if not (isinstance(fields, list) and len(fields) == 6 and fields[0] == _TOKEN_VERSION):
            return None
        _, t_host, t_vm, t_dir, t_client, expires = fields
        if not all(isinstance(v, str) for v in (t_host, t_vm, t_dir, t_client)):
            return None
        if isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= self._clock():
            return None
        if t_host != host or t_vm != vm:
            return None
        return ConsoleGrant(t_host, t_vm, t_dir, t_client, float(expires))


def console_path(host: str, vm: str, token: str) -> str:
    """The path (with its query) of the console page of ``vm`` on ``host``, for a token from
    :meth:`ConsoleLinks.sign`; prefix it with the server's base URL."""
    return f"/console/{quote(host, safe='')}/{quote(vm, safe='')}?token={quote(token, safe='')}"
