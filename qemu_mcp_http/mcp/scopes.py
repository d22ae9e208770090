"""What each tool action needs of a token's grant (see :mod:`..access.grants`): ``read`` < ``operate`` < ``admin``.

Each tool action needs one scope, as its tool's spec declares it (:data:`ACTION_SCOPES`); an action this table
does not know needs ``admin``, so a new action is closed until it is placed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..access.grants import Grant, Scope
from .tools import TOOLS

__all__ = ["ACTION_SCOPES", "refusal", "tool_visible"]

#: The scope each action needs, from the tools' specs; ``None`` is the tool's only action (no ``action`` argument).
ACTION_SCOPES: Mapping[str, Mapping[str | None, Scope]] = {
    spec.name: {action: declared.scope for action, declared in spec.actions.items()} for spec in TOOLS
}


def needed_scope(tool: str, action: object) -> Scope:
    table = ACTION_SCOPES.get(tool, {})
    if None in table:
        return table[None]
    return table.get(action if isinstance(action, str) else "", "admin")


def tool_visible(grant: Grant, tool: str) -> bool:
    """Whether any action of ``tool`` is within the grant's scope (else the tool is left out of tools/list)."""
    table = ACTION_SCOPES.get(tool, {None: "admin"})
    return any(grant.allows(scope) for scope in table.values())


def refusal(grant: Grant, tool: str, arguments: Mapping[str, Any]) -> str | None:
    """Why this call is outside the grant, as a message for the client; ``None`` when it is allowed."""
    action = arguments.get("action")
    scope = needed_scope(tool, action)
    what = f"{tool} {action}" if isinstance(action, str) and None not in ACTION_SCOPES.get(tool, {}) else tool
    if not grant.allows(scope):
        return (
            f"{what} needs the {scope} scope; the token of client {grant.client_id} has {grant.scope} "
            "(ask the operator for a token with that scope)"
        )
    name = str(arguments.get("host") or "localhost").strip()
    if name == "*" or name.startswith("@"):
        return None  # list_vms asks only the hosts of the set the grant reaches
    if not grant.reaches(name):
        allowed = ", ".join(sorted(grant.hosts or ())) or "none"
        return f"the token of client {grant.client_id} may not reach host {name!r} (its hosts: {allowed})"
    return None
