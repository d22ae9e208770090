"""Confirmation before destruction, through the real Python client's elicitation callback on both protocol
generations (2025-11-25: elicitation/create during the call; 2026-07-28: an input-required result and a
retry): accept, an unticked box, decline and cancel; what is asked and what is not; clients without the
capability under --confirm elicit, require (with a token's confirm=never override) and never.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import ElicitRequestParams, ElicitResult

from .guest_image import READY_MARKER, GuestISOs
from .support import ServerProcess

MODES = ["legacy", "2026-07-28"]
Answer = Literal["accept", "untick", "decline", "cancel"]


class User:
    """The person behind the client: answers every question the same way, and remembers them."""

    def __init__(self, answer: Answer = "accept") -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def __call__(self, context: Any, params: ElicitRequestParams) -> ElicitResult:
        self.asked.append(params.message)
        schema = params.requested_schema  # type: ignore[union-attr]
        assert schema["properties"]["confirm"]["type"] == "boolean"
        if self.answer in ("accept", "untick"):
            return ElicitResult(action="accept", content={"confirm": self.answer == "accept"})
        return ElicitResult(action="decline" if self.answer == "decline" else "cancel")


class Caller:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result = await self.client.call_tool(tool, arguments)
        assert result.structured_content is not None, result
        return dict(result.structured_content)


@contextlib.asynccontextmanager
async def connect(url: str, mode: str, user: User | None, token: str | None = None) -> AsyncIterator[Caller]:
    """The real client, declaring elicitation only when it has a ``user`` to ask."""
    callback = user if user is not None else None
    if token is None:
        async with Client(url, mode=mode, elicitation_callback=callback) as client:
            yield Caller(client)
        return
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, elicitation_callback=callback) as client,
    ):
        yield Caller(client)


async def create(caller: Caller, name: str, **extra: Any) -> None:
    made = await caller.call(
        "manage_vm", name=name, action="create", arch="x86_64", memory="64M", disk="size=16M", **extra
    )
    assert made["success"], made


@pytest.mark.parametrize("mode", MODES)
async def test_delete_asks_the_user(server: ServerProcess, mode: str) -> None:
    name = f"ask-{mode[:6]}"
    user = User()
    async with connect(server.url, mode, user) as caller:
        await create(caller, name)
        assert user.asked == []  # create is not destructive
        for answer, words in (
            ("untick", "not confirmed by the user"),
            ("decline", "declined by the user"),
            ("cancel", "cancelled by the user"),
        ):
            user.answer = answer  # type: ignore[assignment]
            refused = await caller.call("manage_vm", name=name, action="delete")
            assert not refused["success"] and words in refused["message"], refused
            assert refused["data"]["error"] == "NotConfirmed"
            assert (server.vm_dir / name / "vm.json").exists()  # nothing changed
        question = user.asked[-1]
        assert f"Delete VM {name}" in question and str(server.vm_dir / name / f"{name}.qcow2") in question
        assert "(16M) is destroyed" in question
        user.answer = "accept"
        deleted = await caller.call("manage_vm", name=name, action="delete")
        assert deleted["success"], deleted
        assert not (server.vm_dir / name).exists()
        assert len(user.asked) == 4


async def test_snapshot_and_guest_writes_ask(server: ServerProcess) -> None:
    user = User("decline")
    async with connect(server.url, "2026-07-28", user) as caller:
        await create(caller, "asksnap")
        made = await caller.call("vm_snapshot", name="asksnap", action="create", snapshot="s1")
        assert made["success"] and user.asked == [], made
        for action, words in (("revert", "Revert VM asksnap"), ("delete", "Delete snapshot s1 of VM asksnap")):
            refused = await caller.call("vm_snapshot", name="asksnap", action=action, snapshot="s1")
            assert "declined by the user" in refused["message"] and words in user.asked[-1]
        listed = await caller.call("vm_snapshot", name="asksnap", action="list")
        assert [s["name"] for s in listed["data"]["snapshots"]] == ["s1"]
        write = await caller.call("vm_guest", name="asksnap", action="write_file", path="/etc/motd", content="hi")
        assert "declined by the user" in write["message"] and "/etc/motd" in user.asked[-1]
        user.answer = "accept"
        gone = await caller.call("vm_snapshot", name="asksnap", action="delete", snapshot="s1")
        assert gone["success"], gone
        user.answer = "accept"
        assert (await caller.call("manage_vm", name="asksnap", action="delete"))["success"]


async def test_modify_that_restarts_asks(server: ServerProcess, guest_isos: GuestISOs) -> None:
    """Memory of a running VM: asked (it restarts); of a stopped VM: not asked."""
    user = User("decline")
    async with connect(server.url, "legacy", user) as caller:
        await create(caller, "askmod", iso=str(guest_isos.amd64), vcpus=1)
        try:
            grown = await caller.call("manage_vm", name="askmod", action="modify", memory="96M")
            assert grown["success"] and user.asked == [], grown
            assert (await caller.call("manage_vm", name="askmod", action="start"))["success"]
            ready = await caller.call("vm_console", name="askmod", action="wait", pattern=READY_MARKER, offset=0)
            assert ready["success"], ready
            refused = await caller.call("manage_vm", name="askmod", action="modify", memory="128M")
            assert "declined by the user" in refused["message"] and "restarts the running VM" in user.asked[-1]
            listed = await caller.call("list_vms", filter_name="askmod")
            assert listed["data"]["vms"][0]["memory"] == "96M" and listed["data"]["vms"][0]["status"] == "running"
        finally:
            user.answer = "accept"
            await caller.call("manage_vm", name="askmod", action="delete", stop_timeout=1)


@pytest.fixture(scope="module")
def policy_servers(workdir: Path) -> Iterator[dict[str, tuple[ServerProcess, str]]]:
    """A server per --confirm policy, each with an admin token and, on `require`, an automation token."""
    servers: dict[str, tuple[ServerProcess, str]] = {}
    with contextlib.ExitStack() as stack:
        for policy in ("require", "never"):
            root = workdir / f"confirm-{policy}"
            (root / "vms").mkdir(parents=True)
            token, robot = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            (root / "tokens").write_text(f"person {token}\nrobot {robot} admin confirm=never\n")
            srv = stack.enter_context(
                ServerProcess(
                    vm_dir=root / "vms",
                    env={
                        "QEMU_MCP_ACCEL": "tcg",
                        "QEMU_MCP_ALLOWED_ROOTS": str(root),
                        "QEMU_MCP_CONFIRM": policy,
                        "QEMU_MCP_TOKEN_FILE": str(root / "tokens"),
                    },
                )
            )
            servers[policy] = (srv, token)
            servers[f"{policy}-robot"] = (srv, robot)
        yield servers


@pytest.mark.parametrize("mode", MODES)
async def test_clients_that_cannot_ask(
    server: ServerProcess, policy_servers: dict[str, tuple[ServerProcess, str]], mode: str
) -> None:
    # elicit (the default): a client without the capability goes ahead.
    async with connect(server.url, mode, None) as caller:
        await create(caller, f"mute-{mode[:6]}")
        assert (await caller.call("manage_vm", name=f"mute-{mode[:6]}", action="delete"))["success"]

    strict, token = policy_servers["require"]
    async with connect(strict.url, mode, None, token) as caller:
        await create(caller, "strict")
        refused = await caller.call("manage_vm", name="strict", action="delete")
        assert not refused["success"] and "this client cannot ask" in refused["message"], refused
        assert "confirm=never" in refused["message"] and (strict.vm_dir / "strict" / "vm.json").exists()
    user = User()
    async with connect(strict.url, mode, user, token) as caller:
        assert (await caller.call("manage_vm", name="strict", action="delete"))["success"]
        assert len(user.asked) == 1
    _, robot = policy_servers["require-robot"]
    async with connect(strict.url, mode, None, robot) as caller:
        await create(caller, "automated")
        assert (await caller.call("manage_vm", name="automated", action="delete"))["success"]

    relaxed, token = policy_servers["never"]
    user = User("decline")
    async with connect(relaxed.url, mode, user, token) as caller:
        await create(caller, "relaxed")
        assert (await caller.call("manage_vm", name="relaxed", action="delete"))["success"]
        assert user.asked == []

    audit = [json.loads(line.partition("qemu_mcp_http.audit: ")[2]) for line in strict.log_text().splitlines()
             if "qemu_mcp_http.audit: " in line]  # fmt: skip
    assert any(a["client"] == "person" and a["success"] is False and "cannot ask" in a["result"] for a in audit)
    assert any(a["client"] == "robot" and a["action"] == "delete" and a["success"] for a in audit)
