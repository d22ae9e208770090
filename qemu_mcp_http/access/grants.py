"""What a bearer token may do: its scope (read < operate < admin), the hosts it may reach, and whether its
calls must be confirmed.

A token file line is ``token`` or ``client-id token [read|operate|admin] [hosts=a,b] [confirm=...]``; no
scope is ``admin`` (what a token could do before scopes existed). What each tool action needs is the tools'
business (:mod:`..mcp.scopes`). Without tokens (a loopback server) every caller is :data:`OPEN`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from mcp.server.auth.middleware.auth_context import get_access_token

from ..config import ConfirmPolicy

__all__ = ["OPEN", "Grant", "Scope", "current_grant", "parse_grant_options"]

Scope = Literal["read", "operate", "admin"]
_LEVEL: dict[str, int] = {"read": 0, "operate": 1, "admin": 2}


@dataclass(frozen=True)
class Grant:
    """What one token allows."""

    client_id: str
    scope: Scope = "admin"
    #: The hosts (``localhost`` or named hosts) it may reach; ``None``: any.
    hosts: frozenset[str] | None = None
    #: Overrides the server's ``--confirm`` for this token (automation that must not be asked).
    confirm: ConfirmPolicy | None = None

    def allows(self, scope: Scope) -> bool:
        return _LEVEL[self.scope] >= _LEVEL[scope]

    def reaches(self, host: str) -> bool:
        return self.hosts is None or host in self.hosts

    @property
    def scopes(self) -> list[str]:
        """Every scope this one includes (for the SDK's ``AccessToken``)."""
        return [s for s, level in _LEVEL.items() if level <= _LEVEL[self.scope]]


#: The caller of a server without tokens (it only listens on loopback): everything.
OPEN = Grant(client_id="open")


def parse_grant_options(client_id: str, options: list[str]) -> Grant:
    """``read|operate|admin``, ``hosts=a,b``, ``confirm=elicit|require|never``, in any order.

    :raise ValueError: an unknown or repeated option (the message names it, never the token).
    """
    scope: Scope = "admin"
    hosts: frozenset[str] | None = None
    confirm: ConfirmPolicy | None = None
    seen: set[str] = set()
    for option in options:
        key = option.partition("=")[0] if "=" in option else "scope"
        if key in seen:
            raise ValueError(f"client {client_id}: {key} given twice")
        seen.add(key)
        if key == "scope":
            if option not in _LEVEL:
                raise ValueError(f"client {client_id}: unknown option {option!r} (scopes: read, operate, admin)")
            scope = option  # type: ignore[assignment]
        elif key == "hosts":
            names = frozenset(h for h in option.partition("=")[2].split(",") if h)
            if not names:
                raise ValueError(f"client {client_id}: hosts= needs at least one host name")
            hosts = names
        elif key == "confirm":
            value = option.partition("=")[2]
            if value not in get_args(ConfirmPolicy):
                raise ValueError(f"client {client_id}: confirm= must be elicit, require or never")
            confirm = value  # type: ignore[assignment]
        else:
            raise ValueError(f"client {client_id}: unknown option {option!r} (scope, hosts=, confirm=)")
    return Grant(client_id, scope, hosts, confirm)


def current_grant(grants: Mapping[str, Grant] | None) -> Grant:
    """The grant of the request being served: its bearer token's, or :data:`OPEN` without tokens.

    Outside a request with a token (a server with tokens always has one) it is the least: read, no host.
    """
    if not grants:
        return OPEN
    token = get_access_token()
    if token is None:
        return Grant(client_id="anonymous", scope="read", hosts=frozenset())
    return grants.get(token.token) or Grant(client_id=token.client_id, scope="read", hosts=frozenset())
