"""What a guest wrote on its serial console → text for a client; screenshots → their size.

Pure functions: no I/O here, so every rule is unit-testable.
"""

from __future__ import annotations

import re
import struct
import zlib

from ..errors import InvalidInput

__all__ = [
    "decode_console",
    "png_dimensions",
    "slice_from_offset",
    "strip_terminal_escapes",
    "tail_lines",
]

# Escape sequences (ECMA-48 / VT100), tried in this order at every ESC.  No class of a repeated
# part holds ESC, so an attempt never scans past the next ESC and a search is linear in the input;
# the possessive quantifiers (``*+``) keep the engine from backtracking into a run.
_ESCAPE = re.compile(
    r"""
      \x1b\[ [0-?]*+ [ -/]*+ [@-~]              # CSI: ESC [ parameters intermediates final, e.g. ESC[0;1m ESC[?7l
    | \x9b [0-?]*+ [ -/]*+ [@-~]                # the same with the one-character C1 CSI
    | \x1b\[ [0-?]*+ [ -/]*+ \Z                # a CSI cut by the end of the text (a read that ended mid-sequence)
    | \x1b[\]PX^_] [^\x07\x1b\x9c]*+ (?:\x07|\x1b\\|\x9c)  # OSC, DCS, SOS, PM, APC: up to BEL or ST (ESC \)
    | \x9d [^\x07\x1b\x9c]*+ (?:\x07|\x1b\\|\x9c)          # OSC with the C1 introducer
    | \x1b[ -/]++ [0-~]                         # nF: charset designations such as ESC ( B, ESC # 8
    | \x1b[0-~]                                 # two characters: ESC c, ESC 7, ESC M, or a malformed start
    | \x1b                                      # a lone ESC (at the end, or before a control)
    | [\x00-\x07\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f-\x9f]   # other C0 and C1 controls, and DEL
    """,
    re.VERBOSE,
)


def _settle_backspaces(segment: str) -> str:
    """Apply each backspace to the text before it: it removes the previous character, if any."""
    kept: list[str] = []
    for char in segment:
        if char != "\b":
            kept.append(char)
        elif kept:
            kept.pop()
    return "".join(kept)


def _settle_line(line: str) -> str:
    """What a terminal leaves on one line (no ``\\n``) written with carriage returns and backspaces.

    A carriage return goes back to the start of the line and the text written after it replaces
    the line (a progress counter or spinner that redraws itself shows only its last state).  A
    carriage return with nothing written after it, as in ``text\\r\\r\\n``, leaves the line alone.
    """
    segments = [_settle_backspaces(segment) if "\b" in segment else segment for segment in line.split("\r")]
    for segment in reversed(segments):
        if segment:
            return segment
    return ""


def strip_terminal_escapes(text: str) -> str:
    """Console output as a log to read: escape sequences and control characters removed.

    * CSI (``ESC [ ... final``), OSC/DCS/APC strings (up to BEL or ``ESC \\``), charset
      designations (``ESC ( B``), two-character ``ESC x`` sequences and stray ESCs are removed;
    * ``\\n`` and ``\\t`` are kept; ``\\r\\n`` becomes ``\\n``; every other C0 or C1 control and
      DEL is removed;
    * a lone ``\\r`` returns to the start of the line: the text after the last one on a line
      replaces what was before (trailing ``\\r`` with nothing after them change nothing);
    * a backspace removes the character before it on its line (so the ``\\b \\b`` a line editor
      echoes to erase a character erases it here too).

    Cursor movement is not emulated: text a program places with cursor addressing comes out in
    the order it was written.  A CSI cut by the end of ``text`` (a read that ended mid-sequence)
    is removed; other sequences cut short lose their first two characters and the rest shows
    as text.  Linear time in ``len(text)``.
    """
    cleaned = _ESCAPE.sub("", text).replace("\r\n", "\n")
    if "\r" not in cleaned and "\b" not in cleaned:
        return cleaned
    return "\n".join(_settle_line(line) if "\r" in line or "\b" in line else line for line in cleaned.split("\n"))


def decode_console(data: bytes) -> str:
    """Console bytes → text: UTF-8, each invalid byte sequence replaced by U+FFFD."""
    return data.decode("utf-8", errors="replace")


def _check_count(value: int, field: str, example: str) -> None:
    """:raise InvalidInput: ``field``: ``value`` is not a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(field, f"{value!r} must be a whole number >= 1, e.g. {example}")


def tail_lines(text: str, n: int) -> str:
    """The last ``n`` lines of ``text`` (all of it when it has fewer).

    A final ``\\n`` ends the last line rather than starting an empty one, and is kept:
    ``tail_lines("a\\nb\\n", 1) == "b\\n"``.  Costs the length of the tail, not of ``text``.

    :raise InvalidInput: ``lines``: ``n`` is not a whole number >= 1.
    """
    _check_count(n, "lines", "lines=50")
    end = len(text) - 1 if text.endswith("\n") else len(text)
    start = end
    for _ in range(n):
        start = text.rfind("\n", 0, start)
        if start < 0:
            return text
    return text[start + 1 :]


def _utf8_cut(chunk: bytes) -> int:
    """How many bytes at the end of ``chunk`` are an unfinished UTF-8 character (0 to 3)."""
    for back in range(1, min(4, len(chunk)) + 1):
        byte = chunk[-back]
        if byte < 0x80:  # ASCII: whatever precedes it is complete or not UTF-8
            return 0
        if byte >= 0xC0:  # a lead byte: unfinished when its sequence needs more than `back` bytes
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if needed > back else 0
    return 0


def slice_from_offset(data: bytes, offset: int, max_bytes: int) -> tuple[bytes, int]:
    """The console bytes from ``offset`` (at most ``max_bytes``) and the offset to read from next.

    * ``offset == len(data)``: nothing new; returns ``(b"", offset)``.
    * ``offset > len(data)``: the log is shorter than when the client read it, so it was
      truncated or rotated (QEMU truncates its console file when the VM starts again).  The
      read restarts at 0, so nothing written since is missed; the client sees it as a returned
      offset lower than the one it sent.
    * The slice does not end inside a UTF-8 character: up to 3 bytes of an unfinished one are
      left for the next read (unless that would return nothing), so each piece decodes cleanly.

    :raise InvalidInput: ``offset``: negative or not a whole number; ``max_bytes``: not a
        whole number >= 1.
    """
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidInput(
            "offset", f"{offset!r} must be a whole number >= 0: 0, or the next_offset of the previous read"
        )
    _check_count(max_bytes, "max_bytes", "max_bytes=65536")
    if offset > len(data):
        offset = 0
    chunk = data[offset : offset + max_bytes]
    cut = _utf8_cut(chunk)
    if 0 < cut < len(chunk):
        chunk = chunk[:-cut]
    return chunk, offset + len(chunk)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_SIDE = 2**31 - 1


def png_dimensions(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of a PNG image, read from its IHDR chunk.

    :raise ValueError: ``data`` does not start with the PNG signature and a well-formed IHDR
        chunk (length 13, a correct CRC, width and height from 1 to 2**31 - 1).
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG image: the PNG signature is missing")
    header = data[8:33]
    if len(header) < 25:
        raise ValueError(f"truncated PNG image: {len(data)} bytes, too short for its IHDR chunk")
    length, kind = struct.unpack(">I4s", header[:8])
    if kind != b"IHDR" or length != 13:
        raise ValueError(f"malformed PNG image: the first chunk is {kind!r} of {length} bytes, not a 13-byte IHDR")
    (crc,) = struct.unpack(">I", header[21:25])
    if zlib.crc32(header[4:21]) != crc:
        raise ValueError("corrupt PNG image: the IHDR chunk's CRC does not match")
    width, height = struct.unpack(">II", header[8:16])
    if not (1 <= width <= _PNG_MAX_SIDE and 1 <= height <= _PNG_MAX_SIDE):
        raise ValueError(f"malformed PNG image: {width}x{height} pixels")
    return width, height
