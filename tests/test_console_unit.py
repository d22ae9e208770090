"""console/ (the serial console and the screen) on a host in memory (tests/fakehost.py): the branches in
milliseconds. The real-QEMU tests (test_console.py, test_web_console.py) stay.
"""

from __future__ import annotations

import asyncio

import pytest

from qemu_mcp_http.console.serial import ConsoleWaitTimeout
from qemu_mcp_http.errors import InvalidInput, QemuError, VMStateError
from qemu_mcp_http.vm.manager import VMManager

from .fakehost import FakeHost, tiny_png

LOG = "/vms/c/console.log"


async def started(vms: VMManager, host: FakeHost, log: bytes = b"") -> str:
    await vms.create("c", "x86_64", "256M", 1, None, None)
    await vms.start("c")
    host.put(LOG, log)
    return "c"


async def test_read_follows_the_log_by_offset(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """The last lines without an offset; from an offset, the bytes after it and where to go on; escapes stripped
    unless raw; an offset past the end (a log that started again) restarts at 0."""
    name = await started(fake_vms, fake_host, b"one\n\x1b[31mtwo\x1b[0m\nthree\n")
    tail = await fake_vms.console_read(name, 2, None, False)
    assert (tail["text"], tail["next_offset"]) == ("two\nthree\n", 23)
    page = await fake_vms.console_read(name, None, 4, True)
    assert page["text"].startswith("\x1b[31mtwo") and page["next_offset"] == 23 and not page["restarted"]
    again = await fake_vms.console_read(name, None, 99, False)
    assert again["restarted"] is True and again["offset"] == 0 and again["text"].startswith("one")
    with pytest.raises(InvalidInput, match="'lines'"):
        await fake_vms.console_read(name, 0, None, False)
    with pytest.raises(InvalidInput, match="'offset'"):
        await fake_vms.console_read(name, None, -1, False)


async def test_wait_finds_a_line_written_later(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """From now: what is already in the log does not count; the prompt without a newline does."""
    name = await started(fake_vms, fake_host, b"login: old\n")

    async def guest_writes() -> None:
        await asyncio.sleep(0.1)
        fake_host.files[LOG] += b"booted\nweb login: "

    writer = asyncio.create_task(guest_writes())
    found = await fake_vms.console_wait(name, r"(\w+) login: $", None, 5.0)
    await writer
    assert found["groups"] == ["web"] and found["context"] == ["booted", "web login: "]
    assert found["offset"] == len(b"login: old\nbooted\n")


async def test_wait_times_out_with_the_console_tail(fake_vms: VMManager, fake_host: FakeHost) -> None:
    name = await started(fake_vms, fake_host, b"still booting\n")
    with pytest.raises(ConsoleWaitTimeout, match="did not appear") as failure:
        await fake_vms.console_wait(name, "never", 0, 0.2)
    assert failure.value.details == {"console_tail": ["still booting"], "next_offset": 14, "search_cpu_seconds": 0.0}


@pytest.mark.parametrize(("pattern", "why"), [("(", "not a valid regular expression"), ("", "regular expression")])
async def test_wait_refuses_a_bad_pattern(fake_vms: VMManager, fake_host: FakeHost, pattern: str, why: str) -> None:
    name = await started(fake_vms, fake_host)
    with pytest.raises(InvalidInput, match=why):
        await fake_vms.console_wait(name, pattern, None, 1.0)


async def test_send_writes_enter_as_a_carriage_return(fake_vms: VMManager, fake_host: FakeHost) -> None:
    name = await started(fake_vms, fake_host)
    sent = await fake_vms.console_send(name, "uname -a\n")
    assert sent == {"bytes_sent": 9} and bytes(fake_host.running().console_input) == b"uname -a\r"
    with pytest.raises(InvalidInput, match="longer than"):
        await fake_vms.console_send(name, "x" * (64 * 1024 + 1))


async def test_a_stopped_vm_has_no_console_input_nor_screen(fake_vms: VMManager) -> None:
    await fake_vms.create("off", "x86_64", "256M", 1, None, None)
    for call in (fake_vms.console_send("off", "x"), fake_vms.console_screenshot("off")):
        with pytest.raises(VMStateError, match="is not running; start it first"):
            await call


async def test_screenshot_is_a_checked_png_and_leaves_no_file(fake_vms: VMManager, fake_host: FakeHost) -> None:
    name = await started(fake_vms, fake_host)
    facts, png = await fake_vms.console_screenshot(name)
    assert png == tiny_png() and facts == {"width": 4, "height": 3, "bytes": len(png), "format": "png"}
    assert not [path for path in fake_host.files if ".screen-" in path]


async def test_a_screendump_that_is_not_a_png_is_refused(fake_vms: VMManager, fake_host: FakeHost) -> None:
    name = await started(fake_vms, fake_host)
    fake_host.running().answers["screendump"] = lambda arguments: fake_host.put(arguments["filename"], b"GIF89a")
    with pytest.raises(QemuError, match="is not a PNG"):
        await fake_vms.console_screenshot(name)


async def test_keys_and_typing_become_paced_send_keys(fake_vms: VMManager, fake_host: FakeHost) -> None:
    name = await started(fake_vms, fake_host)
    pressed = await fake_vms.console_keys(name, ["ctrl-alt-delete", "ret"], 10)
    assert pressed["combos"] == 2
    typed = await fake_vms.console_type(name, "Hi", 10)
    assert typed["combos"] == 2
    keys = [arguments for command, arguments in fake_host.running().commands if command == "send-key"]
    names = [[k["data"] for k in a["keys"]] for a in keys]
    assert names == [["ctrl", "alt", "delete"], ["ret"], ["shift", "h"], ["i"]]
    assert all(a["hold-time"] == 10 for a in keys)
