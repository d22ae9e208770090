"""vm_console with real guests: the serial console (read, send, wait), the screen (screenshot, keys, type).

The busybox test guest runs a shell on its serial console (``guest# ``) and one on its screen and keyboard
(``screen# ``); a second ISO stops at a GRUB menu. Locally, through the test sshd, on arm64, and on the Debian
cloud guest; bad input in-process.
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from .buildcache import link_or_copy
from .debian import DebianPair, guest_call
from .guest_image import READY_MARKER, GuestISOs
from .inprocess import InProcess
from .pngutil import decode_png
from .sshd import SSHServer
from .support import ServerProcess, ToolClient, open_tools

QUICK = 1.0
BOOT = 120.0


async def screenshot(tools: ToolClient, name: str, **where: Any) -> tuple[dict[str, Any], bytes]:
    result = await tools.client.call_tool("vm_console", {**where, "name": name, "action": "screenshot"})
    envelope = result.structured_content
    assert envelope is not None and envelope["success"], envelope
    image = result.content[1]
    assert image.type == "image" and image.mime_type == "image/png"
    png = base64.b64decode(image.data)
    assert envelope["data"]["bytes"] == len(png)
    return envelope["data"], png


async def console_round_trip(tools: ToolClient, name: str, **where: Any) -> None:
    """Wait for the boot marker, send a command, wait for its output; read with offsets that follow the stream."""
    ready = await tools.ok(
        "vm_console", **where, name=name, action="wait", pattern=READY_MARKER, offset=0, timeout=BOOT
    )
    prompt = await tools.ok(
        "vm_console", **where, name=name, action="wait", pattern="guest# $", offset=ready["data"]["offset"], timeout=30
    )
    first = await tools.ok("vm_console", **where, name=name, action="read", offset=0)
    assert READY_MARKER in first["data"]["text"] and first["data"]["next_offset"] >= prompt["data"]["next_offset"]
    sent = await tools.ok("vm_console", **where, name=name, action="send", text="echo MARK-$((6*7))\n")
    assert sent["data"]["bytes_sent"] == len("echo MARK-$((6*7))\r")
    mark = await tools.ok(
        "vm_console", **where, name=name, action="wait", pattern=r"^MARK-(\d+)$", offset=first["data"]["next_offset"]
    )
    assert mark["data"]["groups"] == ["42"] and mark["data"]["offset"] >= first["data"]["next_offset"]
    more = await tools.ok("vm_console", **where, name=name, action="read", offset=first["data"]["next_offset"])
    assert "MARK-42" in more["data"]["text"] and READY_MARKER not in more["data"]["text"]
    tail = await tools.ok("vm_console", **where, name=name, action="read", lines=3)
    assert len(tail["data"]["text"].splitlines()) <= 3


async def test_serial_console_and_typing(tools: ToolClient, guest_isos: GuestISOs, vm_name: str) -> None:
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="x86_64", memory="256M", vcpus=1, disk="size=16M",
        iso=str(guest_isos.amd64),
    )  # fmt: skip
    await tools.ok("manage_vm", name=vm_name, action="start")
    await console_round_trip(tools, vm_name)
    mark = await tools.ok("vm_console", name=vm_name, action="read", lines=1)
    typed = await tools.ok("vm_console", name=vm_name, action="type", text="echo TYPED-$((40+2)) >/dev/console\n")
    assert typed["data"]["combos"] == len("echo TYPED-$((40+2)) >/dev/console\n")
    seen = await tools.ok(
        "vm_console", name=vm_name, action="wait", pattern="TYPED-42", offset=mark["data"]["next_offset"], timeout=30
    )
    assert seen["data"]["match"] == "TYPED-42"
    facts, png = await screenshot(tools, vm_name)
    image = decode_png(png)
    assert (image.width, image.height) == (facts["width"], facts["height"]) == (720, 400)
    assert image.lit_fraction() > 0.005  # the screen shell's lines, not a blank screen
    await tools.ok("manage_vm", name=vm_name, action="delete", stop_timeout=QUICK)


async def test_grub_menu_screenshots_and_keys(tools: ToolClient, guest_isos: GuestISOs, vm_name: str) -> None:
    """The firmware / GRUB screen is a real picture; a key press changes it; Enter boots the chosen entry."""
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="x86_64", memory="256M", vcpus=1, disk="size=16M",
        iso=str(guest_isos.menu_amd64),
    )  # fmt: skip
    await tools.ok("manage_vm", name=vm_name, action="start")
    menu: bytes = b""
    for _ in range(60):  # until GRUB has drawn its menu (SeaBIOS first)
        _, menu = await screenshot(tools, vm_name)
        if decode_png(menu).lit_fraction() > 0.02:
            break
    first = decode_png(menu)
    assert first.distinct_colours() > 1 and first.lit_fraction() > 0.02
    await tools.ok("vm_console", name=vm_name, action="keys", keys="down")
    _, after = await screenshot(tools, vm_name)
    assert after != menu and decode_png(after).lit_fraction() > 0.02
    await tools.ok("vm_console", name=vm_name, action="keys", keys=["ret"])
    await tools.ok("vm_console", name=vm_name, action="wait", pattern=READY_MARKER, offset=0, timeout=BOOT)
    await tools.ok("manage_vm", name=vm_name, action="delete", stop_timeout=QUICK)


async def test_arm64_screen(tools: ToolClient, guest_isos: GuestISOs, vm_name: str) -> None:
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="arm64", memory="256M", vcpus=1, disk="size=16M",
        iso=str(guest_isos.arm64),
    )  # fmt: skip
    await tools.ok("manage_vm", name=vm_name, action="start")
    drawn = 0
    for _ in range(120):  # UEFI and GRUB draw on the virtio-gpu screen while the guest boots
        facts, png = await screenshot(tools, vm_name)
        image = decode_png(png)
        assert (image.width, image.height) == (facts["width"], facts["height"])
        drawn = max(drawn, image.distinct_colours())
        if drawn > 1:
            break
    assert drawn > 1, "the arm64 screen (virtio-gpu) stayed blank"
    await tools.ok("vm_console", name=vm_name, action="wait", pattern=READY_MARKER, offset=0, timeout=BOOT)
    await tools.ok("manage_vm", name=vm_name, action="delete", stop_timeout=QUICK)


async def test_console_through_ssh(remote_server: ServerProcess, sshd: SSHServer, guest_isos: GuestISOs) -> None:
    iso = link_or_copy(guest_isos.amd64, sshd.root / "iso" / "guest-amd64.iso")
    os.chmod(iso.parent, 0o755)
    os.chmod(iso, 0o644)
    where = {"host": "lab", "vm_dir": str(sshd.vm_dir)}
    async with open_tools(remote_server.url) as tools:
        await tools.ok(
            "manage_vm", **where, name="rcon", action="create", arch="x86_64", memory="256M", vcpus=1,
            disk="size=16M", iso=str(iso),
        )  # fmt: skip
        try:
            await tools.ok("manage_vm", **where, name="rcon", action="start")
            await console_round_trip(tools, "rcon", **where)
            facts, png = await screenshot(tools, "rcon", **where)
            assert decode_png(png).width == facts["width"] == 720
            assert not list(Path(sshd.vm_dir / "rcon").glob(".screen-*"))  # read over SFTP, then removed
        finally:
            await tools.call("manage_vm", **where, name="rcon", action="delete", stop_timeout=QUICK)


async def test_debian_console(debian_pair: DebianPair) -> None:
    """The Debian guest's getty prompt is on its serial console (cloud-init may print after it on the same line,
    so no end anchor); its screen is a Linux text console."""
    guest = debian_pair.local
    async with open_tools(guest.url) as tools:
        login = await guest_call(
            tools, guest, "vm_console", action="wait", pattern=r"\bdeb login:", offset=0, timeout=60
        )
        assert login["success"], login["data"].get("details", login)
        _, png = await screenshot(tools, guest.name)
        assert decode_png(png).lit_fraction() > 0.001


async def test_bad_console_input(inproc: InProcess) -> None:
    async with inproc.tools() as tools:
        await tools.ok("manage_vm", name="quiet", action="create", arch="x86_64", memory="64M", disk="size=16M")
        for args, words in (
            ({"action": "send", "text": "x"}, "not running"),
            ({"action": "screenshot"}, "not running"),
            ({"action": "keys", "keys": "ret"}, "not running"),
            ({"action": "wait", "pattern": "(unclosed"}, "not a valid regular expression"),
            ({"action": "wait", "pattern": "x", "timeout": 0.5}, "did not appear"),
            ({"action": "wait"}, "pattern"),
            ({"action": "wait", "pattern": "x", "timeout": "inf"}, "timeout"),
            ({"action": "keys", "keys": "ctrl-alt-nosuchkey"}, "nosuchkey"),
            ({"action": "type", "text": "naïve"}, "ï"),
            ({"action": "type", "text": "x" * 600}, "512"),
            ({"action": "send", "text": "x" * 70000}, "65536"),
            ({"action": "read", "offset": -1}, "offset"),
            ({"action": "read", "lines": 0}, "lines"),
        ):
            answer = await tools.fails("vm_console", name="quiet", **args)
            assert words in answer["message"], (args, answer)
        read = await tools.ok("vm_console", name="quiet", action="read")  # a stopped VM's log still reads
        assert read["data"]["size"] == 0
        await tools.ok("manage_vm", name="quiet", action="delete")


@pytest.mark.parametrize("pattern", ["(a+)+$", "(x*)*y"])
async def test_a_hostile_pattern_cannot_spin(inproc: InProcess, pattern: str) -> None:
    """A pathological pattern over a long guest line is cut off by the search time limit, with a message."""
    async with inproc.tools() as tools:
        await tools.ok("manage_vm", name="spin", action="create", arch="x86_64", memory="64M", disk="size=16M")
        (inproc.vm_dir / "spin" / "console.log").write_text("a" * 40000 + "x" * 40000 + "\n")
        answer = await tools.fails("vm_console", name="spin", action="wait", pattern=pattern, offset=0, timeout=5)
        assert "simplify the pattern" in answer["message"] or "did not appear" in answer["message"], answer
        await tools.ok("manage_vm", name="spin", action="delete")


async def test_web_link_reaches_the_vm_screen(
    tools: ToolClient, server: ServerProcess, guest_isos: GuestISOs, vm_name: str
) -> None:
    """vm_console web gives a signed link; its page loads, and its WebSocket speaks VNC from the VM's socket
    (the browser side is tests/test_web_console.py, in a real Chromium)."""
    await tools.ok(
        "manage_vm", name=vm_name, action="create", arch="x86_64", memory="64M", vcpus=1, disk="size=16M",
        iso=str(guest_isos.amd64),
    )  # fmt: skip
    await tools.ok("manage_vm", name=vm_name, action="start")
    link = (await tools.ok("vm_console", name=vm_name, action="web"))["data"]
    assert link["url"].startswith(f"http://127.0.0.1:{server.port}/console/localhost/{vm_name}?token=")
    token = link["url"].split("token=", 1)[1]
    async with httpx.AsyncClient() as http:
        page = await http.get(link["url"])
        assert page.status_code == 200 and "rfb.js" in page.text
        forged = await http.get(link["url"][:-4] + "AAAA")
        assert forged.status_code == 403
    ws = f"ws://127.0.0.1:{server.port}/console/localhost/{vm_name}/ws?token={token}"
    async with ws_connect(
        ws, origin=websockets.Origin(f"http://127.0.0.1:{server.port}"), subprotocols=[websockets.Subprotocol("binary")]
    ) as socket_:
        greeting = await asyncio.wait_for(socket_.recv(), 10)
        assert isinstance(greeting, bytes) and greeting.startswith(b"RFB 003.00")
    refused = await tools.fails(
        "vm_console", name=vm_name, action="web", host="127.0.0.1", ssh_user="x", ssh_pwd="not-in-a-url"
    )
    assert "named hosts" in refused["message"]
    await tools.ok("manage_vm", name=vm_name, action="delete", stop_timeout=QUICK)
