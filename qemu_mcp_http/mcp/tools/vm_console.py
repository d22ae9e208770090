"""``vm_console``: the serial console (read, send, wait) and the screen (screenshot, keys, type) of a VM."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from mcp_types import CallToolResult, ImageContent, ToolAnnotations
from pydantic import Field

from ...console.links import console_path
from ...errors import InvalidInput
from ...vm.spec import validate_name
from ..calls import client_identity
from .call import Action, Call
from .params import VmDirArg
from .spec import ToolSpec

__all__ = ["ANNOTATIONS", "DESCRIPTION", "TOOL", "vm_console"]

DESCRIPTION = """The serial console and the screen of a VM (locally or over SSH). Actions: read (the last `lines`
lines, or everything from byte `offset` with `next_offset` to follow it; escape sequences stripped unless raw),
send (`text` to the serial console; \\n is Enter), wait (until the regular expression `pattern` matches a console
line, from `offset` or from now, within `timeout`; progress while waiting), screenshot (the screen as a PNG image),
keys (key combinations such as 'ctrl-alt-delete', 'ret', 'esc', 'f2'), type (`text` typed on a US keyboard), web
(a short-lived link to the VM's screen in a browser). send/keys/type are audited (the length of the text, never
the text)."""

ANNOTATIONS = ToolAnnotations(
    title="Console and screen of a VM", read_only_hint=False, destructive_hint=True, idempotent_hint=False,
    open_world_hint=False,
)  # fmt: skip

ActionName = Literal["read", "send", "wait", "screenshot", "keys", "type", "web"]


async def vm_console(
    call: Call,
    name: Annotated[str, Field(description="Name of the VM")],
    action: Annotated[ActionName, Field(description="read, send, wait, screenshot, keys, type or web")],
    lines: Annotated[int | None, Field(description="read: the last this many lines (default 50)")] = None,
    offset: Annotated[
        int | None, Field(description="read/wait: start at this byte of the console log (from next_offset)")
    ] = None,
    raw: Annotated[bool, Field(description="read: keep terminal escape sequences")] = False,
    text: Annotated[str | None, Field(description="send/type: the text (\\n is Enter)")] = None,
    pattern: Annotated[str | None, Field(description="wait: a regular expression, e.g. 'login: $'")] = None,
    timeout: Annotated[
        float, Field(description="wait: seconds to wait (default 120)", gt=0, allow_inf_nan=False)
    ] = 120.0,
    keys: Annotated[
        list[str] | str | None, Field(description="keys: one combination ('ctrl-alt-delete') or a list of them")
    ] = None,
    hold_time_ms: Annotated[int | None, Field(description="keys/type: how long each key is held, ms")] = None,
    vm_dir: VmDirArg = None,
) -> CallToolResult:
    screenshot: list[bytes] = []

    async def work() -> tuple[str, dict[str, Any]]:
        if action == "web":
            call.app.fleet.link_host(call.request)  # before any connection: a link never carries credentials
        async with call.app.vms(call.request, vm_dir, name=name) as vms:
            if action == "read":
                read = await vms.console_read(name, lines, offset, raw)
                return f"read the console of {name} up to byte {read['next_offset']}", read
            if action == "wait":
                if pattern is None:
                    raise InvalidInput("pattern", "wait needs a regular expression, e.g. 'login: $'")
                found = await vms.console_wait(
                    name, pattern, offset, timeout, call.progress(timeout), client_identity(call.ctx)
                )
                return f"{pattern!r} appeared on the console of {name} at byte {found['offset']}", found
            if action == "screenshot":
                facts, png = await vms.console_screenshot(name)
                screenshot.append(png)
                return f"the screen of {name}: {facts['width']}x{facts['height']} PNG", facts
            if action == "web":
                link = _web_link(call, vms.vm_dir, name)
                return f"the screen of {name} in a browser (the link works for {link['expires_in']} s)", link
            if action == "send":
                if text is None:
                    raise InvalidInput("text", "send needs the text, e.g. 'uname -a\\n' (\\n is Enter)")
                sent = await vms.console_send(name, text)
                return f"sent {sent['bytes_sent']} bytes to the console of {name}", sent
            if action == "keys":
                if keys is None:
                    raise InvalidInput("keys", "give a combination such as 'ctrl-alt-delete' or a list of them")
                pressed = await vms.console_keys(name, keys, hold_time_ms)
                return f"pressed {pressed['combos']} key combination(s) on {name}", pressed
            if text is None:
                raise InvalidInput("text", "type needs the text, e.g. 'root\\n'")
            typed = await vms.console_type(name, text, hold_time_ms)
            return f"typed {len(text)} characters on {name}", typed

    # send/keys/type are audited with the length of what was typed, never the text: it may hold a password.
    size = len(text) if text is not None else len(keys) if isinstance(keys, list | str) else 0
    result = await call.run(work(), call.base(vm_name=name, action=action), vm=name, length=size)
    if screenshot and not result.is_error:
        result.content.append(
            ImageContent(type="image", data=base64.b64encode(screenshot[0]).decode(), mime_type="image/png")
        )
    return result


def _web_link(call: Call, vm_dir: str, name: str) -> dict[str, Any]:
    """A signed link to the web console of ``name``, for this server's HTTP address as the client reached it.

    :raise InvalidInput: an SSH host given by address and credentials (no credential ever goes into a URL).
    """
    app = call.app
    host = app.fleet.link_host(call.request)
    token = app.console_links.sign(host, validate_name(name), vm_dir, client_identity(call.ctx))
    http = getattr(call.ctx.request_context, "request", None)
    s = app.settings
    base = str(http.base_url).rstrip("/") if http is not None else f"http://{s.host}:{s.port}"
    return {"url": base + console_path(host, name, token), "expires_in": app.console_links.ttl}


TOOL = ToolSpec(
    "vm_console",
    vm_console,
    DESCRIPTION,
    ANNOTATIONS,
    actions={
        "read": Action("read"),
        "screenshot": Action("read"),
        "wait": Action("read"),
        "send": Action("operate", audit="console-send"),
        "keys": Action("operate", audit="console-keys"),
        "type": Action("operate", audit="console-type"),
        "web": Action("operate"),
    },
)
