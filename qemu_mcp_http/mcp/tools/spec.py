"""A tool as the server registers it, declared in one place: its body, its description and annotations, and its
actions, each with the scope it needs, whether it is audited, the question the user confirms and the resource it
changes. A new tool is one module (a body and its ``TOOL = ToolSpec(...)``) plus one line in
:data:`~qemu_mcp_http.mcp.tools.TOOLS`; a new action is one entry of its tool's ``actions`` (and one word in its
``action`` parameter, checked here).

The body is ``async def tool(call: Call, <its own parameters>)``; registration gives the SDK a function of the
same parameters followed by the MCP context, the ``confirmation`` (when an action asks one) and the host
parameters (:data:`.params.HOST_PARAMETERS`), so the input schema clients see lists the tool's own parameters
first and the host ones last, as each tool listed them itself before.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args, get_origin

from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context, Resolve
from mcp_types import CallToolResult, ToolAnnotations

from ..confirm import Confirm, Question, resolver
from ..context import AppContext
from .call import Action, Call
from .envelope import ToolResult
from .params import HOST_PARAMETERS, host_request

__all__ = ["Action", "ToolSpec"]

#: The answer type every tool declares (its output is the envelope, as structured content).
RESULT = Annotated[CallToolResult, ToolResult]


@dataclass(frozen=True)
class ToolSpec:
    """A tool: see the module's docstring. ``actions`` maps each value of the tool's ``action`` parameter to its
    :class:`Action`; a tool without that parameter has one entry, ``None``."""

    name: str
    fn: Callable[..., Awaitable[CallToolResult]]
    description: str
    annotations: ToolAnnotations
    actions: Mapping[str | None, Action] = field(default_factory=lambda: {None: Action("admin")})
    #: Every answer names the call's action, malformed arguments' too (the spec's data for manage_vm).
    names_action_when_invalid: bool = False

    def action(self, name: object) -> Action | None:
        """The action a call's ``action`` argument names (a tool's only action: whatever it is); ``None``: unknown."""
        if None in self.actions:
            return self.actions[None]
        return self.actions.get(name) if isinstance(name, str) else None

    @property
    def asks(self) -> bool:
        """Whether any action asks the user first."""
        return any(action.confirm is not None for action in self.actions.values())

    def registered(self) -> Callable[..., Awaitable[CallToolResult]]:
        """The function the SDK registers: see the module's docstring.

        :raise TypeError: the body does not take ``call`` first, or its ``action`` values are not the actions'.
        """
        own = list(inspect.signature(self.fn, eval_str=True).parameters.values())
        if not own or own[0].name != "call":
            raise TypeError(f"tool {self.name}: its body takes the Call first, as `call`")
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[1:]]
        self._check_actions(parameters)
        names = [p.name for p in parameters] + [p.name for p in HOST_PARAMETERS]
        extra = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context[AppContext, Any])]
        if self.asks:
            confirm = resolver(self.name, self._question, names, host_request)
            marked = Annotated[ElicitationResult[Confirm], Resolve(confirm)]
            extra.append(inspect.Parameter("confirmation", inspect.Parameter.KEYWORD_ONLY, annotation=marked))
        parameters += [*extra, *HOST_PARAMETERS]
        body = self.fn

        async def tool(**arguments: Any) -> CallToolResult:
            ctx, confirmation = arguments.pop("ctx"), arguments.pop("confirmation", None)
            call = Call(ctx, host_request(arguments), self.action(arguments.get("action")), confirmation)
            return await body(call, **arguments)

        tool.__dict__["__signature__"] = inspect.Signature(parameters, return_annotation=RESULT)
        tool.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": RESULT}
        tool.__name__ = tool.__qualname__ = self.name
        tool.__module__ = body.__module__
        return tool

    def _question(self, action: object) -> Question | None:
        found = self.action(action)
        return found.confirm if found is not None else None

    def _check_actions(self, parameters: list[inspect.Parameter]) -> None:
        declared = next((p.annotation for p in parameters if p.name == "action"), None)
        if declared is None:
            if set(self.actions) != {None}:
                raise TypeError(f"tool {self.name}: actions are declared, but it has no `action` parameter")
            return
        literal = get_args(declared)[0] if get_origin(declared) is Annotated else declared
        if set(get_args(literal)) != set(self.actions):
            known = ", ".join(sorted(map(str, self.actions)))
            raise TypeError(f"tool {self.name}: the values of its `action` parameter are not its actions ({known})")
