"""Console text helpers, fed with a serial console recorded from a real QEMU 7.2 boot.

``tests/data/console-boot.raw`` is the ttyS0 of ``qemu-system-x86_64 -machine q35,graphics=off
-accel tcg -m 256 -nodefaults -display none -cdrom guest-amd64.iso -boot order=nd -netdev user,id=n0
-device virtio-net-pci,netdev=n0 -serial file:console-boot.raw`` (the guest of tests/guest):
``graphics=off`` makes SeaBIOS mirror its screen on the serial line with ANSI sequences (sercon);
Ctrl-B was pressed (QMP ``send-key``) at iPXE's prompt, then ``echo Hellp``, Backspace,
``o from the serial console!``, Enter, ``exit``, Enter were typed with the keys of
:mod:`qemu_mcp_http.console.keys`; iPXE returned to SeaBIOS, which booted GRUB from the CD and GRUB
the Linux guest, until it printed its ready marker.  It holds ``ESC c``, ``ESC[?7l``, SGR colours,
cursor addressing in the middle of a word, ``\\b \\b`` erasures and a line overwritten after a lone
``\\r``.  ``console-boot.txt`` is the expected text, checked line by line against the raw bytes.

``tests/data/screendump-vga.png`` is a QMP ``screendump`` (``format: png``) of a q35 VM with
``-device VGA`` showing SeaBIOS in text mode (720x400).
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_mcp_http.console.text import (
    decode_console,
    png_dimensions,
    slice_from_offset,
    strip_terminal_escapes,
    tail_lines,
)
from qemu_mcp_http.errors import InvalidInput

DATA = Path(__file__).resolve().parent / "data"
BOOT_RAW = (DATA / "console-boot.raw").read_bytes()
BOOT_TEXT = (DATA / "console-boot.txt").read_bytes().decode()
SCREENDUMP = (DATA / "screendump-vga.png").read_bytes()
MIB = 1 << 20
#: No input of a MiB may take longer; the worst measured is ~0.4 s, a quadratic pass takes minutes.
#: A guard against exponential backtracking (measured ~0.4 s for 1 MB), not a speed goal: generous.
HOSTILE_LIMIT_S = 10.0


def test_boot_capture_is_what_it_claims() -> None:
    """The recording really holds the sequences the other tests rely on."""
    for feature in (b"\x1bc", b"\x1b[?7l", b"\x1b[0;36m", b"\x1b[22;14H", b"\x08 \x08", b"...\r    ", b"\r\n"):
        assert feature in BOOT_RAW, feature
    assert len(BOOT_RAW) < 64 * 1024


def test_boot_capture_stripped() -> None:
    """The recorded boot, stripped, is exactly the expected text."""
    assert strip_terminal_escapes(decode_console(BOOT_RAW)) == BOOT_TEXT


def test_boot_capture_reads_as_the_screen_did() -> None:
    """Erased, overwritten and cursor-placed text comes out as a terminal showed it."""
    lines = BOOT_TEXT.split("\n")
    assert lines[0] == "SeaBIOS (version 1.16.2-debian-1.16.2-1)"
    # "Press Ctrl-B for the iPXE command line..." erased by 41 "\b \b", then the typo "Hellp" fixed.
    assert "iPXE> echo Hello from the serial console!" in lines
    assert "Hello from the serial console!" in lines
    assert not any("Press Ctrl-B for the iPXE" in line for line in lines)
    # "Press Ctrl-B to configure iPXE...": a lone \r, then 79 spaces over it.
    assert " " * 79 in lines
    assert "Welcome to GRUB!" in lines  # GRUB moved the cursor between "GRU" and "B!"
    assert lines[-2:] == ["QEMU-MCP-GUEST-READY", ""]
    assert not any(ch < " " and ch not in "\n\t" for ch in BOOT_TEXT)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\x1b[1;31mred\x1b[0m plain", "red plain"),
        ("\x1b[?25l\x1b[2J\x1b[Hhome", "home"),  # private parameters, clear, cursor home
        ("a\x1b[38;2;255;0;0mb", "ab"),  # 24-bit colour
        ("a\x1b[ qb", "ab"),  # CSI with an intermediate byte (DECSCUSR)
        ("\x1b]0;window title\x07text", "text"),  # OSC ended by BEL
        ("\x1b]8;;https://example.org\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC ended by ST (ESC \)
        ("\x1bP1$r0m\x1b\\after", "after"),  # DCS
        ("\x1b_apc\x1b\\x", "x"),  # APC
        ("\x1b(B\x1b)0\x1b#8ascii", "ascii"),  # charset designations, DECALN
        ("\x1bc\x1b7\x1b8\x1bM\x1b=\x1b>x", "x"),  # two-character sequences
        ("\x9b1mC1\x9d0;t\x9c", "C1"),  # C1 CSI and OSC
        ("bell\x07 nul\x00 del\x7f vt\x0b ff\x0c c1\x85", "bell nul del vt ff c1"),
        ("tab\there\n", "tab\there\n"),
        ("dos\r\nline\r\n", "dos\nline\n"),
        ("10%\r50%\r100%\ndone", "100%\ndone"),  # a progress counter shows its last state
        ("text\r\r\n", "text\n"),  # \r with nothing after it changes nothing
        ("tail\r", "tail"),
        ("\r\x1b[Knew", "new"),  # return, erase line, rewrite
        ("Hellp\b \bo", "Hello"),  # a line editor's erasure
        ("\b\bx", "x"),  # backspace at the start of a line
        ("ab\b\b\b\bc", "c"),
        ("abc\x1b[12", "abc"),  # a CSI cut by the end of a read
        ("abc\x1b", "abc"),
        ("a\x1b\nb", "a\nb"),  # ESC before a control: only the ESC goes
        ("a\x1b]0;never ended", "a0;never ended"),  # unterminated OSC: only "ESC ]" goes, no text hidden
        ("caf\u00e9 \u2603 \ufffd", "caf\u00e9 \u2603 \ufffd"),
        ("", ""),
    ],
)
def test_strip_terminal_escapes(raw: str, expected: str) -> None:
    """Each kind of escape sequence and control character is handled as documented."""
    assert strip_terminal_escapes(raw) == expected


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("\x1b[" + "0" * MIB, id="csi-never-ended"),
        pytest.param(("\x1b[" + "1;" * 7) * (MIB // 16), id="many-csi-never-ended"),
        pytest.param("\x1b]0;" + "t" * MIB, id="osc-never-ended"),
        pytest.param(("\x1b]" + "x" * 14) * (MIB // 16), id="many-osc-never-ended"),
        pytest.param("\x1b" * MIB, id="esc-run"),
        pytest.param("\x1b" + " " * MIB, id="nf-never-ended"),
        pytest.param("\x1b(" * (MIB // 2), id="many-nf"),
        pytest.param("\x1bP" * (MIB // 2), id="many-dcs"),
        pytest.param("a\r" * (MIB // 2), id="cr-run"),
        pytest.param("a\b" * (MIB // 2), id="backspace-run"),
        pytest.param("a\r\n\r" * (MIB // 4), id="lines-with-cr"),
        pytest.param("\x1b[1m\x1b]0;t\x07\r\b\x00x\x1b(B\x9b1m\x9dz" * (MIB // 20), id="mixed"),
    ],
)
def test_strip_hostile_input_is_linear(hostile: str) -> None:
    """A MiB crafted against regex backtracking or line handling is stripped in well under a second or two."""
    began = time.perf_counter()
    stripped = strip_terminal_escapes(hostile)
    assert time.perf_counter() - began < HOSTILE_LIMIT_S
    assert "\x1b" not in stripped


@given(st.text(alphabet=st.sampled_from("ab \n\t\r\b\x1b[]0;m?(B\x07\\P\x9b\x00"), max_size=200))
def test_strip_output_is_clean_and_stable(text: str) -> None:
    """Whatever comes in, only printable text, newlines and tabs come out, and stripping again changes nothing."""
    stripped = strip_terminal_escapes(text)
    assert all((ch >= " " and not "\x7f" <= ch <= "\x9f") or ch in "\n\t" for ch in stripped)
    assert strip_terminal_escapes(stripped) == stripped


def test_decode_console_replaces_invalid_bytes() -> None:
    """Valid UTF-8 decodes as is; each invalid sequence becomes U+FFFD instead of failing."""
    assert decode_console("café ☃".encode()) == "café ☃"
    assert decode_console(b"ok\xff\xfe end \xe2\x82") == "ok\ufffd\ufffd end \ufffd"


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("a\nb\nc\n", 1, "c\n"),
        ("a\nb\nc\n", 2, "b\nc\n"),
        ("a\nb\nc", 2, "b\nc"),
        ("a\nb\nc", 3, "a\nb\nc"),
        ("a\nb\nc", 100, "a\nb\nc"),
        ("one line", 1, "one line"),
        ("\n\n", 1, "\n"),
        ("", 5, ""),
    ],
)
def test_tail_lines(text: str, n: int, expected: str) -> None:
    """The last n lines; a final newline ends the last line and is kept."""
    assert tail_lines(text, n) == expected


def test_tail_lines_of_the_boot() -> None:
    """The last lines of the recorded boot are the guest's last messages."""
    assert tail_lines(BOOT_TEXT, 2) == "guest: kernel 6.1.0-56-cloud-amd64 x86_64\nQEMU-MCP-GUEST-READY\n"


@given(st.lists(st.text(alphabet="xy", max_size=3), max_size=8), st.integers(min_value=1, max_value=10))
def test_tail_lines_matches_splitlines(lines: list[str], n: int) -> None:
    """tail_lines agrees with the obvious (slow) definition on newline-terminated text."""
    text = "".join(line + "\n" for line in lines)
    assert tail_lines(text, n) == "".join(line + "\n" for line in lines[-n:])


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_tail_lines_refuses_bad_counts(bad: object) -> None:
    """A count that is not a whole number >= 1 is refused, naming the field 'lines'."""
    with pytest.raises(InvalidInput, match=r"'lines'.*whole number >= 1"):
        tail_lines("a\n", bad)  # type: ignore[arg-type]


def test_slice_reads_the_boot_in_pieces() -> None:
    """Reading from offset 0 with the returned offsets yields every byte once, then nothing new."""
    pieces, offset = [], 0
    while True:
        piece, offset = slice_from_offset(BOOT_RAW, offset, 100)
        if not piece:
            break
        assert len(piece) <= 100
        pieces.append(piece)
    assert b"".join(pieces) == BOOT_RAW
    assert offset == len(BOOT_RAW)
    assert slice_from_offset(BOOT_RAW, len(BOOT_RAW), 100) == (b"", len(BOOT_RAW))


def test_slice_does_not_cut_utf8_characters() -> None:
    """Pieces end on character boundaries, so each decodes on its own; smaller limits still progress."""
    data = "é€𝄞a".encode() * 50
    for size in (1, 2, 3, 4, 5, 7, 64):
        offset, pieces = 0, []
        while offset < len(data):
            piece, offset = slice_from_offset(data, offset, size)
            assert piece, "no progress"
            pieces.append(piece)
        assert b"".join(pieces) == data
        if size >= 4:  # room for the longest character: every piece is whole characters
            for piece in pieces:
                piece.decode()


def test_slice_progresses_on_garbage() -> None:
    """Bytes that are not UTF-8, or a limit smaller than a character, still move the offset forward."""
    assert slice_from_offset(b"\xe2\x82\xac", 0, 2) == (b"\xe2\x82", 2)  # cannot hold the character: cut
    assert slice_from_offset(b"\xf0\xf0\xf0\xf0", 0, 4) == (b"\xf0\xf0\xf0", 3)
    assert slice_from_offset(b"\x80\x80\x80\x80\x80", 0, 3) == (b"\x80\x80\x80", 3)
    assert slice_from_offset(b"ab\xe2\x82", 0, 10) == (b"ab", 2)  # the rest of the character is not written yet


def test_slice_restarts_after_truncation() -> None:
    """An offset past the end means the log was truncated (VM started again): the read restarts at 0."""
    piece, offset = slice_from_offset(b"new boot\n", 5000, 4)
    assert (piece, offset) == (b"new ", 4)
    assert offset < 5000


@pytest.mark.parametrize("offset", [-1, True, 1.0, None])
def test_slice_refuses_bad_offsets(offset: object) -> None:
    """A negative or non-integer offset is refused, saying where a valid one comes from."""
    with pytest.raises(InvalidInput, match=r"'offset'.*next_offset"):
        slice_from_offset(b"abc", offset, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_bytes", [0, -5, False, 2.5])
def test_slice_refuses_bad_limits(max_bytes: object) -> None:
    """A limit that is not a whole number >= 1 is refused."""
    with pytest.raises(InvalidInput, match="'max_bytes'"):
        slice_from_offset(b"abc", 0, max_bytes)  # type: ignore[arg-type]


def test_png_dimensions_of_a_real_screendump() -> None:
    """The recorded QEMU screendump of a VGA text screen is 720x400."""
    assert png_dimensions(SCREENDUMP) == (720, 400)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "signature"),
        (b"GIF89a" + bytes(40), "signature"),
        (SCREENDUMP[:20], "truncated"),
        (SCREENDUMP[:8] + b"\x00\x00\x00\x0dIHDX" + SCREENDUMP[16:], "not a 13-byte IHDR"),
        (SCREENDUMP[:8] + b"\x00\x00\x00\x0eIHDR" + SCREENDUMP[16:], "not a 13-byte IHDR"),
        (SCREENDUMP[:16] + b"\x00\x00\x02\xd1" + SCREENDUMP[20:], "CRC"),  # width 721, old CRC
    ],
)
def test_png_dimensions_refuses_non_png(data: bytes, message: str) -> None:
    """Anything but a PNG signature followed by a well-formed IHDR chunk raises ValueError."""
    with pytest.raises(ValueError, match=message):
        png_dimensions(data)


def test_png_dimensions_refuses_zero_size() -> None:
    """An IHDR with a correct CRC but a zero width is still refused."""
    body = b"IHDR" + struct.pack(">IIBBBBB", 0, 400, 8, 2, 0, 0, 0)
    data = SCREENDUMP[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))
    with pytest.raises(ValueError, match="0x400"):
        png_dimensions(data)
