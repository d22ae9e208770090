"""The screen of a VM (``vm_console`` screenshot, keys, type): QMP ``screendump`` as PNG and ``send-key``.

What the screen shows is the guest's: a screendump is checked to be a PNG of bounded size before anyone sees it.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from ..errors import InvalidInput, QemuError
from ..vm.vmdir import VMDir
from .keys import MAX_TYPE_CHARS, combo_duration_ms, parse_key_sequence, send_key_arguments, text_to_key_combos
from .text import png_dimensions

__all__ = ["MAX_SCREENSHOT_BYTES", "Screen"]

#: Largest PNG a screendump may be.
MAX_SCREENSHOT_BYTES = 16 << 20


class Screen:
    """screenshot, keys, type."""

    def __init__(self, vms: VMDir) -> None:
        self.vms = vms

    async def console_screenshot(self, name: str) -> tuple[dict[str, Any], bytes]:
        """The screen as PNG (QMP ``screendump``; the file QEMU writes on the VM's host is read and removed)."""
        definition = await self.vms.load_running(name)
        path = self.vms.store.paths(definition.name).screenshot(secrets.token_hex(8))
        timeout = self.vms.settings.command_timeout
        try:
            async with self.vms.qmp(definition.name) as qmp:
                await qmp.execute("screendump", {"filename": path, "format": "png"})
            data, size = await self.vms.host.read_range(
                path, offset=0, length=MAX_SCREENSHOT_BYTES + 1, timeout=timeout
            )
        finally:
            await self.vms.run("rm", "-f", "--", path, check=False)
        if size > MAX_SCREENSHOT_BYTES:
            raise QemuError(f"the screendump of VM {definition.name} is larger than {MAX_SCREENSHOT_BYTES} bytes")
        try:
            width, height = png_dimensions(data)
        except ValueError as exc:
            raise QemuError(f"QEMU's screendump of VM {definition.name} is not a PNG: {exc}") from exc
        return {"width": width, "height": height, "bytes": len(data), "format": "png"}, data

    async def console_keys(self, name: str, keys: object, hold_time_ms: int | None) -> dict[str, Any]:
        """Press key combinations (QMP ``send-key``), one after the other, each held ``hold_time_ms``."""
        combos = parse_key_sequence(keys)
        return await self._press(name, combos, hold_time_ms)

    async def console_type(self, name: str, text: str, hold_time_ms: int | None) -> dict[str, Any]:
        """Type ``text`` as key presses on a US keyboard layout."""
        if not isinstance(text, str) or not text:
            raise InvalidInput("text", "give the text to type, e.g. 'root\\n'")
        if len(text) > MAX_TYPE_CHARS:
            raise InvalidInput("text", f"is longer than {MAX_TYPE_CHARS} characters; type it in parts")
        return await self._press(name, text_to_key_combos(text), hold_time_ms)

    async def _press(self, name: str, combos: tuple[tuple[str, ...], ...], hold_time_ms: int | None) -> dict[str, Any]:
        definition = await self.vms.load_running(name)
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with self.vms.qmp(definition.name) as qmp:
            for combo in combos:
                await qmp.execute("send-key", send_key_arguments(combo, hold_time_ms))
                # QEMU's keyboard queue drops events sent faster than they are played: pace them.
                await asyncio.sleep(combo_duration_ms(combo, hold_time_ms) / 1000)
        seconds = loop.time() - began
        return {"combos": len(combos), "seconds": round(seconds, 3)}
