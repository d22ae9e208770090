"""What a tool body gets besides its own arguments (:class:`Call`), and how the call runs its action
(:class:`Action`): a read is guarded; a change is audited, runs to its end, and goes ahead only once confirmed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult

from ...access.audit import audit
from ...access.grants import Scope, current_grant
from ...fleet.targets import HostRequest
from ..calls import client_identity
from ..confirm import Confirm, Question, refusal
from ..context import AppContext
from .envelope import envelope, guarded

__all__ = ["Action", "Call", "Progress"]

#: A wait's progress: ``(elapsed seconds, phase)``, sent to the client as a progress notification.
Progress = Callable[[float, str], Awaitable[None]]
#: A tool body's work: its message and data, or one of our errors.
Work = Coroutine[Any, Any, tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Action:
    """One action of a tool.

    ``scope``: the least a token must grant to call it. ``audit``: the action's name in the audit line; an audited
    action changes state, so it also runs to its end when its client goes away (``None``: a read, neither).
    ``confirm``: the question the client's user answers first (see :mod:`..confirm`). ``changes``: the resource
    change its subscribers hear of once it succeeded: the VM (``vm``), or the VM and the list (``listed``).
    """

    scope: Scope
    audit: str | None = None
    confirm: Question | None = None
    changes: Literal["vm", "listed"] | None = None


@dataclass(frozen=True)
class Call:
    """One call of a tool: its MCP context, its host, the action it runs, and the user's answer when that action
    asks one first."""

    ctx: Context[AppContext, Any]
    request: HostRequest
    action: Action | None
    confirmation: ElicitationResult[Confirm] | None = None

    @property
    def app(self) -> AppContext:
        return self.ctx.request_context.lifespan_context

    def base(self, **fields: Any) -> dict[str, Any]:
        """The data every answer of the call carries: its host, and ``fields`` (``vm_name``, ``action``)."""
        return {"host": self.request.display_name, **fields}

    def progress(self, total: float | None) -> Progress:
        """Progress notifications for a wait of at most ``total`` seconds; a client gone away does not end it."""

        async def report(elapsed: float, phase: str) -> None:
            with contextlib.suppress(Exception):
                note = json.dumps({"phase": phase, "elapsed_s": round(elapsed, 1)}, separators=(",", ":"))
                await self.ctx.report_progress(round(elapsed, 1), total, note)

        return report

    async def run(
        self, work: Work, base: dict[str, Any], *, vm: str | None = None, vm_dir: str | None = None, **audit_fields: Any
    ) -> CallToolResult:
        """Run the body's ``work`` as the call's action says: our errors become ``success: false``; an audited
        action also runs to its end, is audited (with ``audit_fields``), goes ahead only once confirmed, and
        tells the subscribers of VM ``vm`` (in ``vm_dir``) that it changed."""
        action = self.action
        if action is None or action.audit is None:
            return await guarded(work, base)
        where = self.app.fleet.resource_host(self.request, vm_dir) if action.changes and vm else None
        changed = _Changed(where, vm, action.changes == "listed") if where is not None and vm is not None else None
        fields = {"host": self.request.display_name, "vm": vm, "action": action.audit, **audit_fields}
        return await self._audited(work, base, changed, fields)

    async def _audited(
        self, work: Work, base: dict[str, Any], changed: _Changed | None, audit_fields: dict[str, Any]
    ) -> CallToolResult:
        """Run a state-changing tool body to its end, even if the client goes away meanwhile, and audit it.

        A VM half stopped because a client disconnected would help nobody: the work runs in a task of the
        server's (see :class:`..operations.Operations`); a cancelled call stops waiting for it, and the audit
        line, written when the work ends whatever happened, says ``client_gone``. A refusal of the user (see
        :mod:`..confirm`) runs nothing. ``changed``: the resource whose subscribers hear of the change once it
        succeeded.
        """
        app = self.app
        client = client_identity(self.ctx)
        scope = current_grant(app.grants).scope
        refused = refusal(self.confirmation) if self.confirmation is not None else None
        if refused is not None:
            work.close()
            audit(app.settings, client=client, scope=scope, **audit_fields, success=False, result=refused)
            return envelope(False, refused, {**base, "error": "NotConfirmed"})
        gone = False

        async def body() -> CallToolResult:
            result: CallToolResult | None = None
            try:
                result = await guarded(work, base)
                if changed is not None and not result.is_error:
                    await app.changes.vm_changed(changed.host, changed.name, listed=changed.listed)
                return result
            finally:
                outcome = (result.structured_content or {}) if result is not None else {}
                extra = {"client_gone": True} if gone else {}
                audit(
                    app.settings,
                    client=client,
                    scope=scope,
                    **audit_fields,
                    success=bool(outcome.get("success")),
                    result=outcome.get("message", "cancelled (the server is shutting down)"),
                    **extra,
                )

        task = app.operations.detach(body())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            gone = True
            raise


@dataclass(frozen=True)
class _Changed:
    """The VM resource a state-changing call touches (see :meth:`~qemu_mcp_http.fleet.hosts.Fleet.resource_host`)."""

    host: str
    name: str
    #: It appears or goes away (create, delete): the resource list changes too.
    listed: bool = False
