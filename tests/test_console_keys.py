"""Key names and typed text → QMP ``send-key``, checked by hand and against a live QEMU 7.2.

The live tests start ``qemu-system-x86_64`` under TCG with QMP on a unix socket and kill it by PID
afterwards: one q35 with ``-device VGA`` that nothing boots on (the schema, every key name through
``send-key``, a screenshot), and one whose SeaBIOS mirrors its screen on a serial file
(``graphics=off``) so that text typed at iPXE's command line comes back as the guest echoed it.
"""

from __future__ import annotations

import asyncio
import shutil
import string
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from qemu_mcp_http.console.keys import (
    KEY_ALIASES,
    KEY_NAMES,
    MAX_HOLD_TIME_MS,
    MAX_KEY_COMBOS,
    MAX_KEYS_PER_COMBO,
    MAX_TYPE_CHARS,
    QKEYCODES,
    US_LAYOUT,
    combo_duration_ms,
    parse_key_combo,
    parse_key_sequence,
    send_key_arguments,
    text_to_key_combos,
)
from qemu_mcp_http.console.text import png_dimensions, strip_terminal_escapes
from qemu_mcp_http.errors import InvalidInput

QEMU = "qemu-system-x86_64"
START_TIMEOUT = 10.0

# --- parsing, by hand ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "combo"),
    [
        ("ctrl-alt-delete", ("ctrl", "alt", "delete")),
        ("ret", ("ret",)),
        ("shift-tab", ("shift", "tab")),
        ("f2", ("f2",)),
        ("alt-f4", ("alt", "f4")),
        ("ctrl-c", ("ctrl", "c")),
        ("CTRL-Alt-Del", ("ctrl", "alt", "delete")),
        ("  ctrl - alt - delete  ", ("ctrl", "alt", "delete")),
        ("enter", ("ret",)),
        ("Return", ("ret",)),
        ("escape", ("esc",)),
        ("control-shift-esc", ("ctrl", "shift", "esc")),
        ("win-r", ("meta_l", "r")),
        ("super", ("meta_l",)),
        ("pgup", ("pgup",)),
        ("PageDown", ("pgdn",)),
        ("space", ("spc",)),
        ("altgr-q", ("alt_r", "q")),
        ("-", ("minus",)),
        ("ctrl--", ("ctrl", "minus")),
        ("ctrl---a", ("ctrl", "minus", "a")),
        ("ctrl-=", ("ctrl", "equal")),
        ("ctrl-/", ("ctrl", "slash")),
        ("kp_enter", ("kp_enter",)),
        ("A", ("a",)),  # a key, not a character: 'A' is the same key as 'a'
    ],
)
def test_parse_key_combo(text: str, combo: tuple[str, ...]) -> None:
    """Combinations, aliases and case map to QEMU's qcodes, in the order given."""
    assert parse_key_combo(text) == combo


def test_aliases_and_layout_use_real_qcodes() -> None:
    """Every alias and every key of the US layout is a qcode a client may name."""
    assert set(KEY_ALIASES.values()) <= KEY_NAMES
    assert {key for combo in US_LAYOUT.values() for key in combo} <= KEY_NAMES
    assert QKEYCODES - {"unmapped"} == KEY_NAMES


def test_unknown_key_lists_the_valid_ones() -> None:
    """An unknown name is refused with a close match and the compact list of valid names and aliases."""
    with pytest.raises(InvalidInput) as caught:
        parse_key_combo("ctl-alt-del")
    message = caught.value.message
    assert caught.value.field == "keys"
    assert "'ctl' (did you mean 'ctrl'?)" in message
    assert "a-z 0-9 f1-f12 kp_0-kp_9" in message
    assert "ret (enter return)" in message
    for name in ("ctrl", "esc", "delete", "meta_l", "volumeup", "spc"):
        assert f" {name} " in message
    assert "unmapped" not in message
    assert len(message) < 2000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "a key combination is required"),
        ("   ", "a key combination is required"),
        ("ctrl-", "ends with '-'"),
        ("--", "ends with '-'"),
        ("-ctrl", "needs a '-' between key names"),
        ("ctrl--alt", "needs a '-' between key names"),
        ("ctrl- -alt", "empty key name"),
        ("bogus", "unknown key name 'bogus'"),
        ("f13", "unknown key name 'f13'"),  # QEMU 7.2 has no f13
        ("unmapped", "unknown key name 'unmapped'"),
        ("ctrl-x-foo-bar", "unknown key name 'foo', 'bar'"),
        ("esc esc", "give several combinations as a list"),
        ("ctrl-control-c", "presses 'ctrl' twice at once"),
        ("-".join("abcdefghijklmnopq"), f"presses 17 keys at once; at most {MAX_KEYS_PER_COMBO}"),
        ("a" * 500, "too long for one key combination"),
    ],
)
def test_parse_key_combo_refusals(text: str, message: str) -> None:
    """Each malformed combination is refused on the 'keys' field, saying what is wrong."""
    with pytest.raises(InvalidInput, match="Invalid 'keys'") as caught:
        parse_key_combo(text)
    assert message in caught.value.message


def test_parse_key_combo_refuses_non_strings() -> None:
    """A number or None is not a combination."""
    for raw in (None, 42, ["ctrl", "c"]):
        with pytest.raises(InvalidInput, match="give a string such as 'ctrl-alt-delete'"):
            parse_key_combo(raw)  # type: ignore[arg-type]


def test_parse_key_sequence() -> None:
    """One string is one combination; a list is pressed item after item."""
    assert parse_key_sequence("ctrl-alt-delete") == (("ctrl", "alt", "delete"),)
    assert parse_key_sequence(["esc", "down", "Enter"]) == (("esc",), ("down",), ("ret",))
    assert parse_key_sequence(("f2",)) == (("f2",),)
    assert len(parse_key_sequence(["a"] * MAX_KEY_COMBOS)) == MAX_KEY_COMBOS


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "NoneType is not allowed"),
        (42, "int is not allowed"),
        ({"keys": "ret"}, "dict is not allowed"),
        ([], "the list is empty"),
        (["ret"] * (MAX_KEY_COMBOS + 1), f"send at most {MAX_KEY_COMBOS} at a time"),
        (["ret", 5], "item 1 (5) is not a key combination"),
        (["ret", "esc", "bogus"], "item 2: unknown key name 'bogus'"),
        (["ctrl-"], "item 0: 'ctrl-' ends with '-'"),
    ],
)
def test_parse_key_sequence_refusals(raw: object, message: str) -> None:
    """Anything but a string or a bounded list of valid combinations is refused, naming the item."""
    with pytest.raises(InvalidInput, match="Invalid 'keys'") as caught:
        parse_key_sequence(raw)
    assert message in caught.value.message


# --- typing ----------------------------------------------------------------------------------


def test_us_layout_covers_printable_ascii() -> None:
    """Exactly the 95 printable ASCII characters, newline and tab can be typed."""
    assert set(US_LAYOUT) == {chr(c) for c in range(0x20, 0x7F)} | {"\n", "\t"}


@pytest.mark.parametrize(
    ("char", "combo"),
    [
        ("a", ("a",)),
        ("A", ("shift", "a")),
        ("7", ("7",)),
        ("!", ("shift", "1")),
        ("@", ("shift", "2")),
        (")", ("shift", "0")),
        ("_", ("shift", "minus")),
        ("+", ("shift", "equal")),
        ("{", ("shift", "bracket_left")),
        ("|", ("shift", "backslash")),
        (":", ("shift", "semicolon")),
        ('"', ("shift", "apostrophe")),
        ("~", ("shift", "grave_accent")),
        ("<", ("shift", "comma")),
        ("?", ("shift", "slash")),
        ("-", ("minus",)),
        ("`", ("grave_accent",)),
        ("\\", ("backslash",)),
        (" ", ("spc",)),
        ("\n", ("ret",)),
        ("\t", ("tab",)),
    ],
)
def test_us_layout(char: str, combo: tuple[str, ...]) -> None:
    """Characters map to the keys a US keyboard types them with."""
    assert text_to_key_combos(char) == (combo,)


def test_text_to_key_combos() -> None:
    """A line of text becomes one combination per character."""
    assert text_to_key_combos("ls -la\n") == (("l",), ("s",), ("spc",), ("minus",), ("l",), ("a",), ("ret",))
    assert len(text_to_key_combos("x" * MAX_TYPE_CHARS)) == MAX_TYPE_CHARS


def test_untypable_characters_are_named_once() -> None:
    """Each character that cannot be typed is named once, as repr and code point."""
    with pytest.raises(InvalidInput) as caught:
        text_to_key_combos("héllo wörld é\r\n\x1b")
    message = caught.value.message
    assert caught.value.field == "text"
    assert "'é' (U+00E9), 'ö' (U+00F6), '\\r' (U+000D), '\\x1b' (U+001B)" in message
    assert message.count("U+00E9") == 1
    assert "only printable ASCII, '\\n' (Enter) and '\\t' (Tab) can be typed" in message


def test_many_untypable_characters_are_summarised() -> None:
    """Past 20 distinct offenders the message counts the rest instead of naming them."""
    with pytest.raises(InvalidInput, match=r"'μ' \(U\+03BC\) and 5 more with a US keyboard"):
        text_to_key_combos("".join(chr(c) for c in range(0x3A9, 0x3A9 + 25)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "nothing to type"),
        ("x" * (MAX_TYPE_CHARS + 1), f"type at most {MAX_TYPE_CHARS} per request"),
        (None, "NoneType is not allowed"),
        (b"bytes", "bytes is not allowed"),
        ("\x00", "'\\x00' (U+0000)"),
        ("emoji 🙂", "'🙂' (U+1F642)"),
    ],
)
def test_text_refusals(text: object, message: str) -> None:
    """Empty, oversized, non-string and untypable text is refused on the 'text' field."""
    with pytest.raises(InvalidInput, match="Invalid 'text'") as caught:
        text_to_key_combos(text)  # type: ignore[arg-type]
    assert message in caught.value.message


# --- QMP arguments ---------------------------------------------------------------------------


def test_send_key_arguments() -> None:
    """The arguments follow QMP's send-key schema; hold-time only when given."""
    assert send_key_arguments(("ctrl", "alt", "delete")) == {
        "keys": [
            {"type": "qcode", "data": "ctrl"},
            {"type": "qcode", "data": "alt"},
            {"type": "qcode", "data": "delete"},
        ]
    }
    assert send_key_arguments(["ret"], hold_time_ms=100) == {
        "keys": [{"type": "qcode", "data": "ret"}],
        "hold-time": 100,
    }
    assert send_key_arguments(("a",), MAX_HOLD_TIME_MS)["hold-time"] == MAX_HOLD_TIME_MS


@pytest.mark.parametrize(
    ("combo", "hold", "field", "message"),
    [
        ((), None, "keys", "1 to 16 keys, not 0"),
        (("a",) * 17, None, "keys", "1 to 16 keys, not 17"),
        (("enter",), None, "keys", "unknown key name 'enter'"),  # aliases are the parser's job
        (("unmapped",), None, "keys", "unknown key name 'unmapped'"),
        ((5,), None, "keys", "unknown key name '5'"),
        (("a",), 0, "hold_time_ms", "from 1 to 10000"),
        (("a",), -1, "hold_time_ms", "from 1 to 10000"),
        (("a",), MAX_HOLD_TIME_MS + 1, "hold_time_ms", "from 1 to 10000"),
        (("a",), True, "hold_time_ms", "from 1 to 10000"),
        (("a",), 1.5, "hold_time_ms", "from 1 to 10000"),
    ],
)
def test_send_key_arguments_refusals(combo: tuple[Any, ...], hold: Any, field: str, message: str) -> None:
    """Empty, oversized or unknown combinations and hold times QEMU would misread are refused."""
    with pytest.raises(InvalidInput) as caught:
        send_key_arguments(combo, hold)
    assert caught.value.field == field
    assert message in caught.value.message


def test_combo_duration() -> None:
    """QEMU waits hold-time (10 ms by default) after each press and each release."""
    assert combo_duration_ms(("a",)) == 20
    assert combo_duration_ms(("shift", "a")) == 40
    assert combo_duration_ms(("ctrl", "alt", "delete"), 100) == 600


# --- live QEMU -------------------------------------------------------------------------------


@asynccontextmanager
async def running_qemu(*args: str) -> AsyncIterator[tuple[QMPClient, Path]]:
    """``qemu-system-x86_64 -accel tcg -nodefaults -display none ARGS`` with QMP connected; killed by PID at exit.

    Yields the QMP client and the VM's private directory (for a serial file or screenshots).
    """
    workdir = Path(tempfile.mkdtemp(prefix="qmh-con-", dir="/tmp"))  # short: a socket path holds 107 bytes
    socket = workdir / "qmp.sock"
    argv = [QEMU, "-accel", "tcg", "-nodefaults", "-display", "none", "-qmp", f"unix:{socket},server=on,wait=off"]
    proc = await asyncio.create_subprocess_exec(
        *argv, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    qmp = QMPClient("test-console")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                stderr = await proc.stderr.read() if proc.stderr and proc.returncode is not None else b"timed out"
                pytest.fail(f"QEMU did not open its QMP socket: {stderr.decode(errors='replace')}")
            await asyncio.sleep(0.02)
        await qmp.connect(str(socket))
        yield qmp, workdir
    finally:
        try:
            await qmp.disconnect()
        finally:
            if proc.returncode is None:
                proc.kill()  # by PID: this QEMU only
            await proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)


def qkeycode_values(schema: list[dict[str, Any]]) -> list[str]:
    """The QKeyCode enum, found from send-key's arguments (introspection names types by number)."""
    by_name = {entry["name"]: entry for entry in schema}
    arguments = by_name[by_name["send-key"]["arg-type"]]
    keys_array = by_name[next(m["type"] for m in arguments["members"] if m["name"] == "keys")]
    key_value = by_name[keys_array["element-type"]]
    qcode_variant = by_name[next(v["type"] for v in key_value["variants"] if v["case"] == "qcode")]
    enum = by_name[next(m["type"] for m in qcode_variant["members"] if m["name"] == "data")]
    assert enum["meta-type"] == "enum"
    return list(enum["values"])


@pytest.fixture(scope="module")
async def vga_vm() -> AsyncIterator[tuple[QMPClient, Path]]:
    """A q35 VM with a VGA card and nothing to boot, running under TCG."""
    async with running_qemu("-machine", "q35", "-m", "128", "-device", "VGA") as vm:
        yield vm


async def test_qkeycodes_match_live_qemu(vga_vm: tuple[QMPClient, Path]) -> None:
    """QKEYCODES is exactly the QKeyCode enum of the installed QEMU's QMP schema."""
    qmp, _ = vga_vm
    schema = await qmp.execute("query-qmp-schema")
    assert isinstance(schema, list)
    values = qkeycode_values(schema)
    assert len(values) == len(set(values))
    assert frozenset(values) == QKEYCODES


async def test_qemu_accepts_every_key(vga_vm: tuple[QMPClient, Path]) -> None:
    """send-key takes every key name, alias target, US-layout combination and a few combinations."""
    qmp, _ = vga_vm
    combos = {(name,) for name in KEY_NAMES} | set(US_LAYOUT.values())
    combos |= {parse_key_combo(text) for text in ("ctrl-alt-delete", "shift-tab", "alt-f4", "ctrl-c", "win-r")}
    combos |= set(text_to_key_combos("Hello, World! ~/x_y+z?\n\t"))
    rejected = {}
    for combo in sorted(combos):
        try:
            await qmp.execute("send-key", send_key_arguments(combo, hold_time_ms=1))
        except ExecuteError as exc:  # collect every rejection, then report them all
            rejected[combo] = str(exc)
    assert rejected == {}


async def test_screendump_png_dimensions(vga_vm: tuple[QMPClient, Path]) -> None:
    """A QMP screendump in PNG format is read by png_dimensions as one of VGA's boot modes."""
    qmp, workdir = vga_vm
    target = workdir / "screen.png"
    await qmp.execute("screendump", {"filename": str(target), "format": "png"})
    assert png_dimensions(target.read_bytes()) in {(640, 480), (720, 400)}


async def test_qemu_does_not_bound_hold_time(vga_vm: tuple[QMPClient, Path]) -> None:
    """QEMU accepts a negative hold-time (a ~49-day delay once cast), which is why send_key_arguments refuses it.

    Last of the module: the VM's keyboard stays stalled afterwards.
    """
    qmp, _ = vga_vm
    await qmp.execute("send-key", {"keys": [{"type": "qcode", "data": "a"}], "hold-time": -1})
    with pytest.raises(InvalidInput):
        send_key_arguments(("a",), -1)


async def _wait_for(log: Path, needle: bytes, after: int = 0, timeout: float = 15.0) -> int:
    """Wait until ``needle`` is in the serial log past byte ``after``; return where it ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = log.read_bytes() if log.exists() else b""
        found = data.find(needle, after)
        if found >= 0:
            return found + len(needle)
        await asyncio.sleep(0.02)
    tail = log.read_bytes()[-500:] if log.exists() else b"(no log)"
    raise AssertionError(f"{needle!r} not on the serial console after {timeout:g} s; its end: {tail!r}")


@pytest.mark.slow
async def test_typed_text_reaches_the_guest() -> None:
    """Every printable ASCII character typed at iPXE's prompt is echoed back as itself (US layout)."""
    typed = string.ascii_letters + string.digits + " " + string.punctuation
    assert set(typed) == {chr(c) for c in range(0x20, 0x7F)}
    with tempfile.TemporaryDirectory(prefix="qmh-ser-", dir="/tmp") as tmp:
        log = Path(tmp) / "serial.log"
        async with running_qemu(
            *("-machine", "q35,graphics=off", "-m", "128", "-boot", "n"),
            *("-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0"),
            *("-serial", f"file:{log}"),
        ) as (qmp, _):
            await _wait_for(log, b"Press Ctrl-B for the iPXE command line")
            await qmp.execute("send-key", send_key_arguments(parse_key_combo("ctrl-b")))
            prompt_end = await _wait_for(log, b"iPXE> ")
            for combo in text_to_key_combos(typed):
                await qmp.execute("send-key", send_key_arguments(combo))
                # Unpaced, QEMU's keyboard queue overflows and drops keys without an error.
                await asyncio.sleep(combo_duration_ms(combo) / 1000)
            await _wait_for(log, b"}~", prompt_end)
            echoed = strip_terminal_escapes(log.read_bytes()[prompt_end:].decode())
    # SeaBIOS's serial mirror wraps the 80-column screen line.
    assert echoed.replace("\n", "") == typed
