"""Waiting until a started guest is really up: its guest agent answers, or its forwarded SSH port sends a banner.

The wait polls with a short backoff, reports progress (phase, seconds) so that clients see the call alive, notices
a VM that stops meanwhile, and on timeout ends with the last lines of the serial console, the one thing that
tells a person why a guest did not come up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from ..errors import GuestAgentError, InvalidInput, QemuMcpError, SocketUnavailable, VMStateError
from ..vm.spec import VMDefinition
from ..vm.vmdir import VMDir

__all__ = ["GuestNotReady", "WaitMode", "guest_facts", "wait_ready"]

log = logging.getLogger(__name__)

WaitMode = Literal["running", "agent", "ssh"]
WAIT_MODES: tuple[WaitMode, ...] = ("running", "agent", "ssh")
Progress = Callable[[float, str], Awaitable[None]]
#: Seconds between progress notifications while waiting.
PROGRESS_EVERY = 2.0


class GuestNotReady(VMStateError):
    """The guest did not become ready in time; the VM is left running; ``details`` hold its console's end."""


def check_wait(mode: str, timeout: float, limit: float, definition: VMDefinition | None = None) -> WaitMode:
    """:raise InvalidInput: an unknown mode, a timeout that is not finite within 0 .. ``limit``, or ``ssh`` on a
    VM without a forward of its port 22."""
    if mode not in WAIT_MODES:
        raise InvalidInput("wait", f"{mode!r} is not a wait; use running (default), agent or ssh")
    if not math.isfinite(timeout) or not 0 < timeout <= limit:
        raise InvalidInput("wait_timeout", f"{timeout!r} must be a number of seconds above 0, at most {limit:g}")
    if (
        mode == "ssh"
        and definition is not None
        and not any(f.guest_port == 22 and f.proto == "tcp" for f in definition.forwards)
    ):
        raise InvalidInput(
            "wait",
            "wait='ssh' needs a forward of the guest's port 22: create or modify the VM with ports=['22'] "
            "(or e.g. ['2222:22']); or wait for 'agent'",
        )
    return "ssh" if mode == "ssh" else "agent" if mode == "agent" else "running"


async def wait_ready(
    vms: VMDir, definition: VMDefinition, mode: WaitMode, timeout: float, progress: Progress | None = None
) -> dict[str, Any]:
    """Wait until the guest answers as ``mode`` asks; return ``waited_seconds``.

    :raise GuestNotReady: not ready within ``timeout`` (the VM keeps running; details: the console's end).
    :raise VMStateError: the VM stopped while being waited for.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + timeout
    delay = 0.1
    next_report = began
    while True:
        now = loop.time()
        if progress is not None and now >= next_report:
            await progress(now - began, f"waiting for {'the guest agent' if mode == 'agent' else 'SSH'}")
            next_report = now + PROGRESS_EVERY
        facts = (await vms.store.process_facts([definition.name]))[definition.name]
        if not facts.alive:
            raise VMStateError(
                f"VM {definition.name} stopped while waiting for it to be ready",
                {"console_tail": await vms.console_tail(definition.name)},
            )
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        attempt = min(remaining, 3.0)
        if await (
            _agent_answers(vms, definition, attempt) if mode == "agent" else _ssh_answers(vms, definition, attempt)
        ):
            return {"waited_seconds": round(loop.time() - began, 2)}
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 2, 2.0)
    what = "the guest agent did not answer" if mode == "agent" else "no SSH banner came on the guest's port 22"
    raise GuestNotReady(
        f"VM {definition.name} is running, but {what} within {timeout:g} s; it was left running "
        "(details.console_tail: the end of its serial console)",
        {"console_tail": await vms.console_tail(definition.name)},
    )


async def _agent_answers(vms: VMDir, definition: VMDefinition, timeout: float) -> bool:
    paths = vms.store.paths(definition.name)
    try:
        async with vms.shared.agents.session(vms.host, paths.qga_socket, timeout) as agent:
            await agent.execute("guest-ping", timeout=timeout)
    except QemuMcpError:
        return False
    return True


async def _ssh_answers(vms: VMDir, definition: VMDefinition, timeout: float) -> bool:
    """Whether the forwarded port 22 sends an SSH banner (user networking accepts the connection at once and
    drops it while nothing listens in the guest, so only the banner counts)."""
    port = definition.ssh_port
    hint = vms.ssh_hint(definition)
    if port is None or hint is None:
        return False
    try:
        sock = await vms.host.open_tcp_socket(hint["host"], port, timeout=timeout)
    except (SocketUnavailable, QemuMcpError):
        return False
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError:
        sock.close()
        return False
    try:
        banner = await asyncio.wait_for(reader.read(255), timeout)
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    return banner.startswith(b"SSH-")


async def guest_facts(vms: VMDir, definition: VMDefinition, timeout: float) -> dict[str, Any] | None:
    """Hostname, OS and addresses per interface from the guest agent, or ``None`` when it does not answer.

    All of it is written by the guest: only plain values of bounded size are kept.
    """
    paths = vms.store.paths(definition.name)
    try:
        async with vms.shared.agents.session(vms.host, paths.qga_socket, timeout) as agent:
            host = await agent.execute("guest-get-host-name", timeout=timeout)
            osinfo = await agent.execute("guest-get-osinfo", timeout=timeout)
            interfaces = await agent.execute("guest-network-get-interfaces", timeout=timeout)
    except (GuestAgentError, QemuMcpError):
        return None
    return {
        "hostname": _text((host or {}).get("host-name") if isinstance(host, dict) else None),
        "os": _text(osinfo.get("pretty-name") or osinfo.get("name")) if isinstance(osinfo, dict) else None,
        "interfaces": _addresses(interfaces),
    }


def _text(value: object, limit: int = 200) -> str | None:
    return str(value)[:limit] if isinstance(value, str | int | float) else None


def _addresses(interfaces: object) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if not isinstance(interfaces, list):
        return out
    for entry in interfaces[:64]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        addresses = entry.get("ip-addresses")
        found = [
            f"{a.get('ip-address')}/{a.get('prefix')}"
            for a in (addresses if isinstance(addresses, list) else [])[:32]
            if isinstance(a, dict) and isinstance(a.get("ip-address"), str) and len(a["ip-address"]) <= 64
        ]
        out[entry["name"][:32]] = found
    return out
