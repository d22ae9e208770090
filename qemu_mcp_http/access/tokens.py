"""Bearer tokens: read once from the settings, each with its grant (see :mod:`.grants`), and checked by the SDK's
own auth middleware through :class:`StaticTokenVerifier` (401 without a valid token; in constant time)."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from mcp.server.auth.provider import AccessToken

from ..config import Settings
from .grants import Grant, parse_grant_options

__all__ = ["SCOPE", "StaticTokenVerifier", "fingerprint", "load_tokens"]

#: The scope every valid token has (the SDK's ``required_scopes``); a grant adds read / operate / admin.
SCOPE = "qemu"


def load_tokens(settings: Settings) -> dict[str, Grant]:
    """``{token: grant}`` from ``token`` (admin) and ``token_file``: lines ``token`` (admin) or
    ``client-id token [read|operate|admin] [hosts=a,b] [confirm=elicit|require|never]`` (see :mod:`.grants`).

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
