"""ToolSpec (mcp/tools/spec.py): what registration makes of a tool's body, and the mistakes it refuses."""

from __future__ import annotations

import inspect
from typing import Annotated, Literal

import pytest
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from qemu_mcp_http.mcp.confirm import Asking, Decision, NotAsked
from qemu_mcp_http.mcp.tools import TOOLS
from qemu_mcp_http.mcp.tools.call import Action, Call
from qemu_mcp_http.mcp.tools.params import HOST_PARAMETERS
from qemu_mcp_http.mcp.tools.spec import ToolSpec

ANNOTATIONS = ToolAnnotations(title="t")


async def two_actions(
    call: Call, action: Annotated[Literal["look", "touch"], Field(description="what")], depth: int = 1
) -> CallToolResult:
    raise AssertionError("not called")


async def ask(asking: Asking) -> Decision:
    return NotAsked("never asked here")


def spec_of(actions: dict[str | None, Action]) -> ToolSpec:
    return ToolSpec("t", two_actions, "d", ANNOTATIONS, actions=actions)


def test_the_registered_function_takes_the_body_s_parameters_then_the_context_and_the_host() -> None:
    registered = spec_of({"look": Action("read"), "touch": Action("admin")}).registered()
    parameters = list(inspect.signature(registered).parameters)
    assert parameters == ["action", "depth", "ctx", *(p.name for p in HOST_PARAMETERS)]


def test_an_action_that_asks_adds_the_confirmation() -> None:
    registered = spec_of({"look": Action("read"), "touch": Action("admin", audit="touch", confirm=ask)}).registered()
    assert "confirmation" in inspect.signature(registered).parameters


@pytest.mark.parametrize("actions", [{"look": Action("read")}, {None: Action("read")}])
def test_actions_must_be_the_action_parameter_s_values(actions: dict[str | None, Action]) -> None:
    with pytest.raises(TypeError, match="are not its actions"):
        spec_of(actions).registered()


def test_a_body_takes_the_call_first() -> None:
    async def no_call(name: str) -> CallToolResult:
        raise AssertionError("not called")

    with pytest.raises(TypeError, match="takes the Call first"):
        ToolSpec("t", no_call, "d", ANNOTATIONS).registered()


def test_every_tool_registers_and_its_questions_are_audited() -> None:
    """Every listed tool registers; an action that asks the user first changes state, so it is audited."""
    for spec in TOOLS:
        spec.registered()
        unaudited = [name for name, action in spec.actions.items() if action.confirm and action.audit is None]
        assert not unaudited, f"{spec.name}: {unaudited} ask first but are not audited"
