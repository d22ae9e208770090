"""Scoped tokens through HTTP with the real client: every scope against every tool and action (the table of
qemu_mcp_http.access.grants, checked here against an independent copy), tools/list per scope, a token limited to
hosts (tools, resources, completion), the audit line's client and scope, and malformed token files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourcesListChanged
from mcp_types import ResourceListChangedNotification, ResourceTemplateReference

from qemu_mcp_http.access.tokens import load_tokens
from qemu_mcp_http.config import Settings

from .support import ServerProcess, wait_for

#: What the issue asks, written out again: (tool, action) -> the least scope that may call it.
EXPECTED = {
    ("list_vms", None): "read",
    ("monitor_vm_status", None): "read",
    ("vm_console", "read"): "read",
    ("vm_console", "screenshot"): "read",
    ("vm_console", "wait"): "read",
    ("vm_snapshot", "list"): "read",
    ("vm_guest", "info"): "read",
    ("manage_vm", "start"): "operate",
    ("manage_vm", "stop"): "operate",
    ("vm_console", "send"): "operate",
    ("vm_console", "keys"): "operate",
    ("vm_console", "type"): "operate",
    ("vm_console", "web"): "operate",
    ("vm_snapshot", "create"): "operate",
    ("vm_snapshot", "revert"): "operate",
    ("manage_vm", "create"): "admin",
    ("manage_vm", "delete"): "admin",
    ("manage_vm", "modify"): "admin",
    ("vm_snapshot", "delete"): "admin",
    ("vm_guest", "exec"): "admin",
    ("vm_guest", "write_file"): "admin",
    ("vm_guest", "read_file"): "admin",
}
LEVEL = {"read": 0, "operate": 1, "admin": 2}
#: Arguments that make an allowed call fail harmlessly (no VM "ghost"; create with a bad memory size).
EXTRA: dict[tuple[str, str | None], dict[str, Any]] = {
    ("manage_vm", "create"): {"arch": "x86_64", "memory": "lots"},
    ("manage_vm", "modify"): {"memory": "128M"},
    ("monitor_vm_status", None): {"count": 1},
    ("vm_console", "send"): {"text": "x"},
    ("vm_console", "type"): {"text": "x"},
    ("vm_console", "keys"): {"keys": "ret"},
    ("vm_console", "wait"): {"pattern": "x", "timeout": 0.5},
    ("vm_snapshot", "revert"): {"snapshot": "s"},
    ("vm_snapshot", "delete"): {"snapshot": "s"},
    ("vm_guest", "exec"): {"command": ["true"]},
    ("vm_guest", "write_file"): {"path": "/tmp/x", "content": "x"},
    ("vm_guest", "read_file"): {"path": "/tmp/x"},
}


@pytest.fixture(scope="module")
def scoped(workdir: Path) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    root = workdir / "scoped"
    (root / "vms").mkdir(parents=True)
    tokens = {who: secrets.token_urlsafe(24) for who in ("reader", "operator", "boss", "legacy", "fenced", "homebound")}
    (root / "tokens").write_text(
        f"# client-id token [scope] [hosts=...]\nreader {tokens['reader']} read\n"
        f"operator {tokens['operator']} operate\n"
        f"boss {tokens['boss']} admin\nlegacy {tokens['legacy']}\nfenced {tokens['fenced']} admin hosts=lab,ci\n"
        f"homebound {tokens['homebound']} read hosts=localhost\n"
    )
    with ServerProcess(
        vm_dir=root / "vms",
        env={
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_ALLOWED_ROOTS": str(root),
            "QEMU_MCP_TOKEN_FILE": str(root / "tokens"),
            "QEMU_MCP_AUDIT_LOG": str(root / "audit.log"),
        },
    ) as srv:
        yield srv, tokens


@contextlib.asynccontextmanager
async def as_client(url: str, token: str, mode: str = "2026-07-28", on_message: Any = None) -> AsyncIterator[Client]:
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, message_handler=on_message) as client,
    ):
        yield client


def test_the_table_is_the_issue_s() -> None:
    from qemu_mcp_http.mcp.scopes import ACTION_SCOPES
    from qemu_mcp_http.mcp.tools import TOOLS

    table = {(tool, action): scope for tool, actions in ACTION_SCOPES.items() for action, scope in actions.items()}
    assert table == EXPECTED
    assert {spec.name for spec in TOOLS} == {tool for tool, _ in EXPECTED}


@pytest.mark.parametrize("who", ["reader", "operator", "boss", "legacy"])
async def test_every_scope_against_every_action(scoped: tuple[ServerProcess, dict[str, str]], who: str) -> None:
    server, tokens = scoped
    level = {"reader": 0, "operator": 1, "boss": 2, "legacy": 2}[who]
    scope_name = {0: "read", 1: "operate", 2: "admin"}[level]
    async with as_client(server.url, tokens[who]) as client:
        listed = {tool.name for tool in (await client.list_tools()).tools}
        expected_tools = {tool for (tool, _), scope in EXPECTED.items() if LEVEL[scope] <= level}
        assert listed == expected_tools
        for (tool, action), scope in EXPECTED.items():
            arguments: dict[str, Any] = {"name": "ghost", **EXTRA.get((tool, action), {})}
            if action is not None:
                arguments["action"] = action
            if tool == "list_vms":
                arguments = {}
            result = (await client.call_tool(tool, arguments)).structured_content
            assert result is not None
            allowed = LEVEL[scope] <= level
            if allowed:
                assert result["data"].get("error") != "Forbidden", (who, tool, action, result)
            else:
                assert not result["success"] and result["data"]["error"] == "Forbidden", (who, tool, action, result)
                what = tool if action is None else f"{tool} {action}"
                assert result["message"].startswith(f"{what} needs the {scope} scope; the token of client {who} "
                                                    f"has {scope_name}")  # fmt: skip
    lines = [json.loads(line) for line in (server.vm_dir.parent / "audit.log").read_text().splitlines()]
    mine = [line for line in lines if line["client"] == who]
    assert mine and {line["scope"] for line in mine} == {scope_name}
    if level >= 1:
        assert any(line["action"] == "start" and line["vm"] == "ghost" for line in mine)
    else:
        assert {line["action"] for line in mine} == {"guest-info"}  # vm_guest audits every call; nothing else


async def test_a_token_limited_to_hosts(scoped: tuple[ServerProcess, dict[str, str]]) -> None:
    server, tokens = scoped
    async with as_client(server.url, tokens["boss"]) as boss:
        create = {"name": "mine", "action": "create", "arch": "x86_64", "memory": "64M", "disk": "size=16M"}
        made = (await boss.call_tool("manage_vm", create)).structured_content
        assert made is not None and made["success"], made
        assert [str(r.uri) for r in (await boss.list_resources()).resources] == ["vm://localhost/mine"]
    try:
        for mode in ("legacy", "2026-07-28"):
            async with as_client(server.url, tokens["fenced"], mode) as fenced:
                local = (await fenced.call_tool("list_vms", {})).structured_content
                assert local is not None and local["data"]["error"] == "Forbidden"
                assert "may not reach host 'localhost' (its hosts: ci, lab)" in local["message"]
                elsewhere = (await fenced.call_tool("list_vms", {"host": "lab"})).structured_content
                assert elsewhere is not None and elsewhere["data"].get("error") != "Forbidden", elsewhere
                assert (await fenced.list_resources()).resources == []
                with pytest.raises(MCPError, match="no host 'localhost'"):
                    await fenced.read_resource("vm://localhost/mine")
                hosts = await fenced.complete(ResourceTemplateReference(uri="vm://{host}/{name}"),
                                              {"name": "host", "value": ""})  # fmt: skip
                assert hosts.completion.values == []
                if mode == "2026-07-28":
                    with pytest.raises(MCPError, match="may not reach host 'localhost'"):
                        async with fenced.listen(resource_subscriptions=["vm://localhost/mine"]):
                            pass
                else:
                    with pytest.raises(MCPError, match="may not reach host 'localhost'"):
                        await fenced.subscribe_resource("vm://localhost/mine")
    finally:
        async with as_client(server.url, tokens["boss"]) as boss:
            await boss.call_tool("manage_vm", {"name": "mine", "action": "delete"})


async def test_list_changes_reach_only_the_tokens_that_see_the_host(
    scoped: tuple[ServerProcess, dict[str, str]],
) -> None:
    """A VM created on localhost: ``list_changed`` reaches the listen streams and subscribed sessions of the
    tokens that may see localhost (``boss``: every host; ``homebound``: hosts=localhost), and never those of
    ``fenced`` (hosts=lab,ci), on either protocol generation."""
    server, tokens = scoped
    heard: dict[str, list[str]] = {}

    async def listening(stack: contextlib.AsyncExitStack, who: str, uri: str) -> None:
        new_key, old_key = f"{who} listen", f"{who} subscribe"
        heard[new_key], heard[old_key] = [], []

        async def on_message(message: Any) -> None:
            if isinstance(message, ResourceListChangedNotification):
                heard[old_key].append("list_changed")

        old = await stack.enter_async_context(as_client(server.url, tokens[who], "legacy", on_message))
        await old.subscribe_resource(uri)
        new = await stack.enter_async_context(as_client(server.url, tokens[who]))
        stream = await stack.enter_async_context(new.listen(resources_list_changed=True))

        async def read() -> None:
            async for event in stream:
                if isinstance(event, ResourcesListChanged):
                    heard[new_key].append("list_changed")

        reader = asyncio.create_task(read())
        stack.push_async_callback(_cancel, reader)

    async with contextlib.AsyncExitStack() as stack:
        await listening(stack, "boss", "vm://localhost/anything")
        await listening(stack, "homebound", "vm://localhost/anything")
        await listening(stack, "fenced", "vm://lab/anything")
        async with as_client(server.url, tokens["boss"]) as boss:
            create = {"name": "listed", "action": "create", "arch": "x86_64", "memory": "64M", "disk": "size=16M"}
            made = (await boss.call_tool("manage_vm", create)).structured_content
            assert made is not None and made["success"], made
            try:
                wanted = ("boss listen", "boss subscribe", "homebound listen", "homebound subscribe")

                async def all_heard() -> bool:
                    return all(heard[key] for key in wanted)

                assert await wait_for(all_heard, 15, interval=0.05), heard
                await asyncio.sleep(1.0)  # whatever else was sent has arrived by now
            finally:
                await boss.call_tool("manage_vm", {"name": "listed", "action": "delete"})
    assert heard["fenced listen"] == [] and heard["fenced subscribe"] == [], heard


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("me tok-0123456789abcdef superuser", "unknown option 'superuser'"),
        ("me tok-0123456789abcdef read admin", "scope given twice"),
        ("me tok-0123456789abcdef hosts=", "hosts= needs at least one host"),
        ("me tok-0123456789abcdef confirm=maybe", "confirm= must be elicit, require or never"),
        ("me tok-0123456789abcdef flavour=x", "unknown option 'flavour=x'"),
    ],
)
def test_malformed_token_lines(tmp_path: Path, line: str, words: str) -> None:
    (tmp_path / "tokens").write_text(f"# tokens\nok tok-aaaaaaaaaaaaaaaaaa read\n{line}\n")
    with pytest.raises(ValueError, match="line 3") as failure:
        load_tokens(Settings(token_file=str(tmp_path / "tokens")))
    assert words in str(failure.value) and "tok-0123456789abcdef" not in str(failure.value)


def test_token_lines(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(
        "tok-plain-0123456789\nops tok-ops-0123456789 operate hosts=lab\nci tok-ci-0123456789ab confirm=never\n"
    )
    grants = load_tokens(Settings(token_file=str(tmp_path / "tokens")))
    assert grants["tok-plain-0123456789"].scope == "admin"
    ops = grants["tok-ops-0123456789"]
    assert (ops.client_id, ops.scope, ops.hosts, ops.confirm) == ("ops", "operate", frozenset({"lab"}), None)
    ci = grants["tok-ci-0123456789ab"]
    assert (ci.scope, ci.hosts, ci.confirm) == ("admin", None, "never")
