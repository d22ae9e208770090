"""A client's regular expression over a guest's console: checked, compiled and searched within bounds.

Both sides are hostile here: the client writes the pattern, the guest writes the lines.  Three bounds keep
either from making the server spin:

* **compiling** (on the event loop, where the ``regex`` module holds the GIL) costs time in proportion to the
  pattern once its counted repeats are unrolled: ``((((a{100}){100}){100}){100})``, 30 characters, compiled
  for more than a minute.  :func:`pattern_weight` estimates that size from the text and :func:`compile_pattern`
  refuses a pattern above :data:`MAX_PATTERN_WEIGHT` or with counted repeats nested deeper than
  :data:`MAX_REPEAT_DEPTH` (tens of milliseconds to compile at most) before compiling it;
  group calls and recursion, whose size the text does not show, are refused too;
* **searching** runs in a worker thread (:mod:`..cpu`) with ``concurrent=True``, so that the ``regex`` module
  releases the GIL and the event loop keeps running;
* every line's search has a time limit (:data:`SEARCH_SECONDS`, less when the call has less left), and
  :func:`search_lines` stops between lines once its :class:`~..cpu.Job` has no time left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import regex

from ..cpu import Job
from ..errors import InvalidInput
from .text import decode_console, strip_terminal_escapes

__all__ = [
    "MAX_PATTERN_CHARS",
    "MAX_PATTERN_WEIGHT",
    "MAX_REPEAT_DEPTH",
    "LineSearch",
    "compile_pattern",
    "pattern_weight",
    "search_lines",
]

MAX_PATTERN_CHARS = 4096
#: The largest estimated size of a compiled pattern, and the deepest nesting of counted repeats: compiling
#: grows with the size and, for each level of nesting, about twice as fast (measured: at most ~50 ms within both).
MAX_PATTERN_WEIGHT = 4_000
MAX_REPEAT_DEPTH = 3
#: Time one search may take over one line.
SEARCH_SECONDS = 0.5
#: The longest line searched (a guest may print megabytes without a newline).
MAX_LINE_BYTES = 64 * 1024

_COUNTED = re.compile(r"\{(\d*)(?:,(\d*))?\}")
#: Group calls and recursion: ``(?R)``, ``(?0)``, ``(?1)``, ``(?+1)``, ``(?&name)``, ``(?P>name)``.
_GROUP_CALL = re.compile(r"\(\?(?:R|[+-]?\d+|&\w+|P>\w+)\)")
#: The V1 behaviour (nested sets) changes what a ``[`` means; :func:`pattern_weight` reads V0.
_VERSION1 = re.compile(r"\(\?[\^a-zA-Z0-9-]*V1")
#: After a backslash, these take a braced or bracketed argument: ``\p{L}``, ``\N{...}``, ``\x{41}``, ``\g<1>``.
_BRACED_ESCAPES = frozenset("pPNxuUgLXk")


def pattern_weight(pattern: str, limit: int = MAX_PATTERN_WEIGHT) -> tuple[int, int]:
    """The size of ``pattern`` with its counted repeats unrolled, and how deeply counted repeats nest.

    Each atom counts 1, ``X{m,n}`` counts ``max(m, n)`` times the weight of ``X`` (a group's weight is the sum
    of its parts) and is one level deeper than the deepest counted repeat inside ``X``.  Stops counting once
    the weight is above ``limit`` (returns a number above it).  Overestimates rather than under: text it does
    not understand counts as atoms.
    """
    frames: list[list[list[int]]] = [[]]  # per open group: [weight, depth] of each of its atoms
    i, end = 0, len(pattern)
    while i < end:
        char = pattern[i]
        if char == "\\":
            i = _escape_end(pattern, i)
            frames[-1].append([1, 0])
            continue
        if char == "[":
            i = _class_end(pattern, i)
            frames[-1].append([1, 0])
            continue
        if char == "(":
            frames.append([])
            i += 1
            continue
        if char == ")" and len(frames) > 1:
            inner = frames.pop()
            frames[-1].append([max(1, sum(w for w, _ in inner)), max((d for _, d in inner), default=0)])
            i += 1
            continue
        if char == "{" and frames[-1]:
            counted = _COUNTED.match(pattern, i)
            if counted is not None and (counted.group(1) or counted.group(2)):
                times = max(int(counted.group(1) or 0), int(counted.group(2) or 0), 1)
                atom = frames[-1][-1]
                atom[0] *= min(times, limit + 1)
                atom[1] += 1
                i = counted.end()
                if atom[0] > limit:
                    return limit + 1, atom[1]
                continue
        frames[-1].append([1, 0])
        i += 1
    atoms = [atom for frame in frames for atom in frame]  # groups never closed count as written
    return sum(w for w, _ in atoms), max((d for _, d in atoms), default=0)


def _escape_end(pattern: str, start: int) -> int:
    """The index after the escape at ``start`` (``\\x``, or ``\\p{...}`` and the like with its argument)."""
    after = start + 2
    if after - 1 < len(pattern) and pattern[after - 1] in _BRACED_ESCAPES and after < len(pattern):
        opener = pattern[after]
        if opener in "{<":
            close = pattern.find("}" if opener == "{" else ">", after)
            return len(pattern) if close < 0 else close + 1
    return after


def _class_end(pattern: str, start: int) -> int:
    """The index after the character class at ``start`` (V0 rules: a ``]`` first is literal, ``[:name:]``
    is a POSIX class, any other ``[`` is literal)."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
        elif char == "[" and pattern.startswith("[:", i) and (close := pattern.find(":]", i + 2)) >= 0:
            i = close + 2
        elif char == "]":
            return i + 1
        else:
            i += 1
    return len(pattern)


def compile_pattern(pattern: object) -> regex.Pattern[str]:
    """A client's ``pattern`` compiled for :func:`search_lines` (``MULTILINE``).

    :raise InvalidInput: not a string of 1 to :data:`MAX_PATTERN_CHARS` characters, too large once unrolled,
        a group call or recursion, or not a valid regular expression.
    """
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidInput(
            "pattern", f"give a regular expression of at most {MAX_PATTERN_CHARS} characters, e.g. 'login: $'"
        )
    if _GROUP_CALL.search(pattern) or _VERSION1.search(pattern):
        raise InvalidInput(
            "pattern", "group calls and recursion ((?R), (?1), (?&name)) and the V1 flag are not accepted here"
        )
    weight, depth = pattern_weight(pattern)
    if weight > MAX_PATTERN_WEIGHT or depth > MAX_REPEAT_DEPTH:
        raise InvalidInput(
            "pattern",
            f"is too large once its counted repeats are unrolled (at most {MAX_PATTERN_WEIGHT} elements, and "
            f"counted repeats such as {{3}} nested at most {MAX_REPEAT_DEPTH} deep; (?:a{{100}}){{101}} is too "
            "large); use smaller counts, or + and * instead",
        )
    try:
        return regex.compile(pattern, regex.MULTILINE)
    except (regex.error, OverflowError, RecursionError) as exc:
        raise InvalidInput("pattern", f"{pattern!r} is not a valid regular expression: {exc}") from exc


@dataclass
class LineSearch:
    """What :func:`search_lines` found in a run of console lines."""

    #: Index of the first matching line, and its cleaned text; ``None``: no line matched.
    index: int | None = None
    text: str = ""
    match: str = ""
    groups: list[str | None] = field(default_factory=list)
    #: The cleaned text of the last lines searched without a match (at most 6), for context.
    tail: list[str] = field(default_factory=list)
    #: Lines searched (all of them unless ``stopped``).
    searched: int = 0
    #: The job ran out of time before every line was searched.
    stopped: bool = False


def search_lines(compiled: regex.Pattern[str], lines: list[bytes], job: Job) -> LineSearch:
    """Search each console line (decoded, escape sequences stripped, at most :data:`MAX_LINE_BYTES`) in turn,
    until one matches or ``job`` has no time left.  Runs in a worker thread: the ``regex`` module releases the
    GIL while it matches (``concurrent=True``).

    :raise InvalidInput: one line alone took more than :data:`SEARCH_SECONDS` (the pattern is pathological).
    """
    found = LineSearch()
    for index, line in enumerate(lines):
        allowance = job.remaining()
        if allowance <= 0:
            found.stopped = True
            return found
        text = strip_terminal_escapes(decode_console(line[:MAX_LINE_BYTES]))
        limit = min(SEARCH_SECONDS, allowance)
        try:
            match = compiled.search(text, timeout=limit, concurrent=True)
        except TimeoutError as exc:
            if limit < SEARCH_SECONDS:  # the call's time, not the line, ran out
                found.stopped = True
                return found
            raise InvalidInput(
                "pattern", f"searching one console line took more than {SEARCH_SECONDS:g} s; simplify the pattern"
            ) from exc
        found.searched = index + 1
        if match is not None:
            found.index, found.text = index, text
            found.match = match.group(0)[:1000]
            found.groups = [g[:1000] if isinstance(g, str) else None for g in match.groups()[:20]]
            return found
        found.tail = [*found.tail[-5:], text[:1000]]
    return found
