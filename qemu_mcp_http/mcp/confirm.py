"""Confirmation before destruction: the client's user is asked (MCP elicitation) before an action whose
:class:`~qemu_mcp_http.mcp.tools.spec.Action` names a question (a delete, a modify that restarts a running VM,
a snapshot revert or delete, a guest write_file; the questions live beside their tools).

Each tool with such an action has a parameter filled by a resolver (the SDK's ``Resolve``, made here by
:func:`resolver`): it runs before the tool body, lets the action's question decide whether to ask, and returns an
``Elicit`` (the SDK asks: ``elicitation/create`` during the call on the handshake revisions, an input-required
result and a retry on 2026-07-28) or a :class:`NotAsked` that says why not. The body then goes ahead only on
:func:`refusal` ``None``. Nothing is held while the user thinks: the resolver takes no lock, and the question
names what will be destroyed as it is when asked.

The policy is ``--confirm`` (or a token's ``confirm=``): ``elicit`` asks clients that can and lets the others
go ahead, ``require`` refuses the others, ``never`` asks nobody.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mcp.server.elicitation import AcceptedElicitation, ElicitationResult
from mcp.server.mcpserver import Context, Elicit
from pydantic import BaseModel, Field

from ..access.grants import current_grant
from ..errors import QemuMcpError
from ..fleet.targets import HostRequest
from ..vm.manager import VMManager
from .context import AppContext

__all__ = ["Asking", "Confirm", "Decision", "NotAsked", "Question", "refusal", "resolver"]

log = logging.getLogger(__name__)


class Confirm(BaseModel):
    """The form the user sees."""

    confirm: bool = Field(default=False, title="Confirm", description="Tick to go ahead")


@dataclass(frozen=True)
class NotAsked:
    """The resolver did not ask: ``why``; ``refuse`` is the message when the call must not go ahead."""

    why: str
    refuse: str | None = None


Decision = Elicit[Confirm] | NotAsked


def refusal(outcome: ElicitationResult[Any]) -> str | None:
    """``None``: go ahead; else the message of the refused call."""
    if not isinstance(outcome, AcceptedElicitation):
        return "cancelled by the user" if outcome.action == "cancel" else "declined by the user (nothing was changed)"
    answer = outcome.data
    if isinstance(answer, NotAsked):
        return answer.refuse
    if isinstance(answer, Confirm) and answer.confirm:
        return None
    return "not confirmed by the user (the box was not ticked; nothing was changed)"


def _can_ask(ctx: Context[Any, Any]) -> bool:
    capabilities = ctx.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    # A bare `elicitation: {}` (before modes existed) means forms; url-only clients cannot show ours.
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


@dataclass(frozen=True)
class Asking:
    """What an action's question gets: the call's MCP context, its host and its (validated) arguments."""

    ctx: Context[AppContext, Any]
    request: HostRequest
    arguments: Mapping[str, Any]

    @property
    def where(self) -> str:
        return "on this server's host" if self.request.is_local else f"on host {self.request.display_name}"

    async def decide(self, what: str, question: Callable[[], Awaitable[str]]) -> Decision:
        """Ask ``question()`` when the policy and the client allow it; ``what`` names the change when a client
        that cannot ask is refused."""
        app = self.ctx.request_context.lifespan_context
        grant = current_grant(app.grants)
        policy = grant.confirm or app.settings.confirm
        if policy == "never":
            return NotAsked("confirmation is off")
        if not _can_ask(self.ctx):
            if policy == "require":
                return NotAsked(
                    "client cannot ask",
                    refuse=f"{what} must be confirmed by the user, and this client cannot ask (it did not declare "
                    "the elicitation capability); use a client that can, or ask the operator for a token with "
                    "confirm=never for automation",
                )
            return NotAsked("the client cannot ask its user")
        return Elicit(await question(), Confirm)

    async def ask(self, what: str, text: str) -> Decision:
        """:meth:`decide` with a question known already."""

        async def question() -> str:
            return text

        return await self.decide(what, question)

    async def about_vm(self, fallback: str, describe: Callable[[VMManager], Awaitable[str]]) -> str:
        """``describe(vms)`` with the VMs of the call's host and vm_dir: a question with what the VM's files say;
        the plain ``fallback`` when they cannot be read (the call itself then says what is wrong)."""
        app = self.ctx.request_context.lifespan_context
        name = str(self.arguments.get("name"))
        try:
            async with app.vms(self.request, self.arguments.get("vm_dir"), name=name) as vms:
                return await describe(vms)
        except QemuMcpError:
            return fallback


#: An action's question: a :class:`Decision` (ask, or why not) from what the call asks for.
Question = Callable[[Asking], Awaitable[Decision]]


def resolver(
    tool: str,
    question_of: Callable[[object], Question | None],
    arguments: Sequence[str],
    request_of: Callable[[dict[str, Any]], HostRequest],
) -> Callable[..., Awaitable[Decision]]:
    """The SDK resolver of a tool's ``confirmation`` parameter: it takes the tool's ``arguments`` by name and asks
    the question of the call's action (``question_of(action)``; ``None``: nothing to confirm).

    Its wire key (``module:qualname``, carried by a 2026-07-28 retry) names the tool: ``confirm_<tool>``.
    """

    async def confirm(ctx: Context[AppContext, Any], **given: Any) -> Decision:
        question = question_of(given.get("action"))
        if question is None:
            return NotAsked("not destructive")
        return await question(Asking(ctx, request_of(dict(given)), given))

    parameters = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context[AppContext, Any])]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in arguments]
    confirm.__dict__["__signature__"] = inspect.Signature(parameters, return_annotation=Decision)
    confirm.__annotations__ = {"ctx": Context[AppContext, Any], "return": Decision}
    confirm.__qualname__ = confirm.__name__ = f"confirm_{tool}"
    return confirm
