"""Key names and typed text → QMP ``send-key`` arguments (US keyboard layout).

Pure functions: no I/O here, so every rule is unit-testable.

What QEMU 7.2 does with ``send-key`` (``ui/input-legacy.c``, ``ui/input.c``), and why the bounds
below exist:

* it presses the keys in the order given and releases them in reverse, with a delay of
  ``hold-time`` milliseconds (0 or absent: 10 ms) of the guest's clock after every event;
* it checks nothing but the key names: any number of keys (even none) and any ``hold-time``
  are accepted, and a negative one is cast to an unsigned 32-bit delay of ~49 days that
  stalls the VM's keyboard until it is reset, hence :data:`MAX_HOLD_TIME_MS`;
* the events wait in one queue of at most 1024 entries (3 per key press or release while
  earlier keys are still playing); past that QEMU drops key events *silently*, so a caller
  typing many combinations must let each play out (:func:`combo_duration_ms`) before it
  sends the next.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidInput

__all__ = [
    "DEFAULT_HOLD_TIME_MS",
    "KEY_ALIASES",
    "KEY_NAMES",
    "MAX_HOLD_TIME_MS",
    "MAX_KEYS_PER_COMBO",
    "MAX_KEY_COMBOS",
    "MAX_TYPE_CHARS",
    "QKEYCODES",
    "US_LAYOUT",
    "combo_duration_ms",
    "parse_key_combo",
    "parse_key_sequence",
    "send_key_arguments",
    "text_to_key_combos",
]

#: Every value of QEMU 7.2's ``QKeyCode`` enum, as ``query-qmp-schema`` reports it
#: (tests/test_console_keys.py asks a live QEMU again and fails if this drifts).
QKEYCODES: frozenset[str] = frozenset(
    {
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "a", "ac_back", "ac_bookmarks", "ac_forward", "ac_home",
        "ac_refresh", "again", "alt", "alt_r", "apostrophe", "asterisk", "audiomute", "audionext", "audioplay",
        "audioprev", "audiostop", "b", "backslash", "backspace", "bracket_left", "bracket_right", "c", "calculator",
        "caps_lock", "comma", "compose", "computer", "copy", "ctrl", "ctrl_r", "cut", "d", "delete", "dot", "down",
        "e", "end", "equal", "esc", "f", "f1", "f10", "f11", "f12", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9",
        "find", "front", "g", "grave_accent", "h", "help", "henkan", "hiragana", "home", "i", "insert", "j", "k",
        "katakanahiragana", "kp_0", "kp_1", "kp_2", "kp_3", "kp_4", "kp_5", "kp_6", "kp_7", "kp_8", "kp_9", "kp_add",
        "kp_comma", "kp_decimal", "kp_divide", "kp_enter", "kp_equals", "kp_multiply", "kp_subtract", "l", "lang1",
        "lang2", "left", "less", "lf", "m", "mail", "mediaselect", "menu", "meta_l", "meta_r", "minus", "muhenkan",
        "n", "num_lock", "o", "open", "p", "paste", "pause", "pgdn", "pgup", "power", "print", "props", "q", "r",
        "ret", "right", "ro", "s", "scroll_lock", "semicolon", "shift", "shift_r", "slash", "sleep", "spc", "stop",
        "sysrq", "t", "tab", "u", "undo", "unmapped", "up", "v", "volumedown", "volumeup", "w", "wake", "x", "y",
        "yen", "z",
    }
)  # fmt: skip

#: The qcodes a client may name: all but ``unmapped``, which QEMU accepts and sends as nothing.
KEY_NAMES: frozenset[str] = QKEYCODES - {"unmapped"}

#: The US-layout keys of punctuation characters (typed as they are, or named in a combination).
_PUNCTUATION = {
    "-": "minus",
    "=": "equal",
    "[": "bracket_left",
    "]": "bracket_right",
    "\\": "backslash",
    ";": "semicolon",
    "'": "apostrophe",
    "`": "grave_accent",
    ",": "comma",
    ".": "dot",
    "/": "slash",
}

#: Friendly names (lower case) → qcode.  A bare ``-`` is handled by the parser: it is the separator.
KEY_ALIASES: dict[str, str] = {
    "enter": "ret",
    "return": "ret",
    "escape": "esc",
    "del": "delete",
    "ins": "insert",
    "control": "ctrl",
    "ctrl_l": "ctrl",
    "shift_l": "shift",
    "alt_l": "alt",
    "altgr": "alt_r",
    "win": "meta_l",
    "windows": "meta_l",
    "super": "meta_l",
    "meta": "meta_l",
    "cmd": "meta_l",
    "pageup": "pgup",
    "page_up": "pgup",
    "pagedown": "pgdn",
    "page_down": "pgdn",
    "pgdown": "pgdn",
    "space": "spc",
    "bksp": "backspace",
    "capslock": "caps_lock",
    "numlock": "num_lock",
    "scrolllock": "scroll_lock",
    "printscreen": "print",
    "prtsc": "print",
    "period": "dot",
    "grave": "grave_accent",
    "backtick": "grave_accent",
    "quote": "apostrophe",
    **{char: key for char, key in _PUNCTUATION.items() if char != "-"},
}

#: Keys pressed together in one combination.  QEMU 7.2 has no limit of its own (the 16 of old
#: QEMU's HMP ``sendkey`` is gone); no real combination needs more, and 16 keys stay far
#: below the 1024 events of QEMU's keyboard queue.
MAX_KEYS_PER_COMBO = 16
#: Combinations in one ``keys`` request.
MAX_KEY_COMBOS = 64
#: Characters in one ``type`` request (each is one or two keys).
MAX_TYPE_CHARS = 512
#: QEMU's delay after every key event when ``hold-time`` is not given.
DEFAULT_HOLD_TIME_MS = 10
#: The longest ``hold-time`` accepted: QEMU bounds nothing (see the module docstring).
MAX_HOLD_TIME_MS = 10_000

_UNSHIFTED_SYMBOLS = {" ": "spc", "\n": "ret", "\t": "tab", **_PUNCTUATION}
_SHIFTED_SYMBOLS = dict(
    zip(
        '!@#$%^&*()_+{}|:"~<>?',
        [
            *"1234567890",
            *("minus", "equal", "bracket_left", "bracket_right", "backslash", "semicolon", "apostrophe"),
            *("grave_accent", "comma", "dot", "slash"),
        ],
        strict=True,
    )
)


def _us_layout() -> dict[str, tuple[str, ...]]:
    """Every character a US keyboard types → the keys that type it."""
    layout: dict[str, tuple[str, ...]] = {}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        layout[letter] = (letter,)
        layout[letter.upper()] = ("shift", letter)
    for digit in "0123456789":
        layout[digit] = (digit,)
    for char, key in _UNSHIFTED_SYMBOLS.items():
        layout[char] = (key,)
    for char, key in _SHIFTED_SYMBOLS.items():
        layout[char] = ("shift", key)
    return layout


#: The 95 printable ASCII characters, ``\n`` and ``\t`` → their key combination on a US keyboard.
US_LAYOUT: dict[str, tuple[str, ...]] = _us_layout()
#: At most this many offending characters are named in one message.
_MAX_NAMED_CHARS = 20


def _compact_names(names: frozenset[str]) -> str:
    """``names`` sorted, with the runs a-z, 0-9, f1-f12 and kp_0-kp_9 written as ranges."""
    runs = {
        "a-z": {chr(c) for c in range(ord("a"), ord("z") + 1)},
        "0-9": {str(d) for d in range(10)},
        "f1-f12": {f"f{n}" for n in range(1, 13)},
        "kp_0-kp_9": {f"kp_{d}" for d in range(10)},
    }
    parts: list[str] = []
    covered: set[str] = set()
    for label, run in runs.items():
        if run <= names:
            parts.append(label)
            covered |= run
    return " ".join(parts + sorted(names - covered))


def _compact_aliases(aliases: dict[str, str]) -> str:
    """``{"enter": "ret", "return": "ret"}`` → ``ret (enter return)``, sorted by key."""
    by_key: dict[str, list[str]] = {}
    for alias, key in aliases.items():
        by_key.setdefault(key, []).append(alias)
    return ", ".join(f"{key} ({' '.join(sorted(names))})" for key, names in sorted(by_key.items()))


_VALID_KEYS_HELP = (
    "join key names with '-', e.g. 'ctrl-alt-delete', 'shift-tab', 'alt-f4', 'ret', 'ctrl--' (ctrl and minus); "
    f"names are case-insensitive. Keys: {_compact_names(KEY_NAMES)}. "
    f"Aliases: {_compact_aliases(KEY_ALIASES)}."
)


class _Refused(Exception):
    """A combination is refused; the text says why (callers turn it into :class:`InvalidInput`)."""


def _split_combo(text: str) -> list[str]:
    """``ctrl-alt-delete`` → names; a ``-`` where a name is expected is the minus key.

    :raise _Refused: a separator with no key after it, or two names with no separator.
    """
    names: list[str] = []
    position = 0
    while True:
        if position == len(text):
            raise _Refused(f"{text!r} ends with '-' and no key after it; e.g. 'ctrl-c' or 'ctrl--'")
        if text[position] == "-":
            names.append("-")
            position += 1
        else:
            end = text.find("-", position)
            end = len(text) if end < 0 else end
            names.append(text[position:end].strip())
            position = end
        if position == len(text):
            return names
        if text[position] != "-":
            raise _Refused(f"{text!r} needs a '-' between key names, e.g. 'ctrl--' or 'ctrl-alt-delete'")
        position += 1


def _resolve(name: str) -> str | None:
    """A lower-case key name or alias → its qcode, or None when unknown."""
    if name == "-":
        return "minus"
    if name in KEY_NAMES:
        return name
    return KEY_ALIASES.get(name)


def _unknown_keys_message(unknown: list[str], text: str) -> str:
    """The refusal for names that are neither qcodes nor aliases, with close matches when any."""
    known = sorted(KEY_NAMES | KEY_ALIASES.keys())
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=2, cutoff=0.75)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        described.append(f"{name!r}{hint}")
    several = "; give several combinations as a list" if any(any(c.isspace() for c in n) for n in unknown) else ""
    return f"unknown key name {', '.join(described)} in {text!r}{several}; {_VALID_KEYS_HELP}"


def _parse_combo(text: str) -> tuple[str, ...]:
    """:func:`parse_key_combo` without the field name.

    :raise _Refused: as :func:`parse_key_combo` says.
    """
    stripped = text.strip().lower()
    if not stripped:
        raise _Refused("a key combination is required, e.g. 'ret', 'esc' or 'ctrl-alt-delete'")
    if len(stripped) > MAX_KEYS_PER_COMBO * 24:  # longer than any allowed combination can be spelled
        raise _Refused(f"{text[:40]!r}... is too long for one key combination")
    names = _split_combo(stripped)
    if any(not name for name in names):
        raise _Refused(f"{text!r} has an empty key name between separators; e.g. 'ctrl-alt-delete'")
    codes = [_resolve(name) for name in names]
    unknown = list(dict.fromkeys(name for name, code in zip(names, codes, strict=True) if code is None))
    if unknown:
        raise _Refused(_unknown_keys_message(unknown, text))
    combo = tuple(code for code in codes if code is not None)
    if len(combo) > MAX_KEYS_PER_COMBO:
        raise _Refused(
            f"{text!r} presses {len(combo)} keys at once; at most {MAX_KEYS_PER_COMBO} keys make one combination"
            " (give keys pressed one after the other as a list of combinations)"
        )
    repeated = sorted({code for code in combo if combo.count(code) > 1})
    if repeated:
        raise _Refused(
            f"{text!r} presses {', '.join(repr(r) for r in repeated)} twice at once; to press a key again, "
            "give a list of combinations, e.g. ['esc', 'esc']"
        )
    return combo


def parse_key_combo(text: str) -> tuple[str, ...]:
    """One key combination (``ctrl-alt-delete``, ``ret``, ``shift-tab``, ``F2``) → its qcodes, in order.

    Names are case-insensitive; aliases (``enter``, ``escape``, ``del``, ``win``, ``pgup``,
    ``space``, ...) map to qcodes; a ``-`` where a key name is expected is the minus key.
    QEMU presses the keys in this order and releases them in reverse.

    :raise InvalidInput: ``keys``: not a string, empty, an unknown name (the message lists
        the valid ones), a key given twice, or more than :data:`MAX_KEYS_PER_COMBO` keys.
    """
    if not isinstance(text, str):
        raise InvalidInput("keys", f"{text!r} is not a key combination; give a string such as 'ctrl-alt-delete'")
    try:
        return _parse_combo(text)
    except _Refused as refused:
        raise InvalidInput("keys", str(refused)) from None


def parse_key_sequence(raw: object) -> tuple[tuple[str, ...], ...]:
    """One combination (a string) or a list of them, pressed one after the other → their qcodes.

    :raise InvalidInput: ``keys``: neither a string nor a list of strings, an empty list, more
        than :data:`MAX_KEY_COMBOS` combinations, or a combination :func:`parse_key_combo` refuses
        (the message then says which item).
    """
    if isinstance(raw, str):
        return (parse_key_combo(raw),)
    if not isinstance(raw, list | tuple):
        raise InvalidInput(
            "keys",
            f"{type(raw).__name__} is not allowed; give a key combination such as 'ctrl-alt-delete' "
            "or a list of them such as ['esc', 'down', 'ret']",
        )
    if not raw:
        raise InvalidInput("keys", "the list is empty; give at least one key combination, e.g. ['ret']")
    if len(raw) > MAX_KEY_COMBOS:
        raise InvalidInput(
            "keys", f"{len(raw)} combinations is too many for one request; send at most {MAX_KEY_COMBOS} at a time"
        )
    combos = []
    for index, item in enumerate(raw):
        if not isinstance(item, str):
            raise InvalidInput(
                "keys", f"item {index} ({item!r}) is not a key combination; every item must be a string such as 'ret'"
            )
        try:
            combos.append(_parse_combo(item))
        except _Refused as refused:
            raise InvalidInput("keys", f"item {index}: {refused}") from None
    return tuple(combos)


def _describe_char(char: str) -> str:
    """``'é' (U+00E9)``."""
    return f"{char!r} (U+{ord(char):04X})"


def text_to_key_combos(text: str) -> tuple[tuple[str, ...], ...]:
    """Text → one key combination per character, as a US keyboard types it (``'A'`` → ``('shift', 'a')``).

    Printable ASCII, ``\\n`` (Enter) and ``\\t`` (Tab) can be typed.

    :raise InvalidInput: ``text``: not a string, empty, longer than :data:`MAX_TYPE_CHARS`, or
        holding characters a US keyboard cannot type (each is named once, as repr and code point).
    """
    if not isinstance(text, str):
        raise InvalidInput("text", f"{type(text).__name__} is not allowed; give the text to type as a string")
    if not text:
        raise InvalidInput("text", "nothing to type; give the text, e.g. 'root\\n'")
    if len(text) > MAX_TYPE_CHARS:
        raise InvalidInput(
            "text", f"{len(text)} characters is too long; type at most {MAX_TYPE_CHARS} per request (split the text)"
        )
    untypable = list(dict.fromkeys(char for char in text if char not in US_LAYOUT))
    if untypable:
        named = ", ".join(_describe_char(char) for char in untypable[:_MAX_NAMED_CHARS])
        more = f" and {len(untypable) - _MAX_NAMED_CHARS} more" if len(untypable) > _MAX_NAMED_CHARS else ""
        raise InvalidInput(
            "text",
            f"cannot type {named}{more} with a US keyboard; only printable ASCII, '\\n' (Enter) and '\\t' (Tab) "
            "can be typed. Send other text over the serial console, or press keys with the 'keys' action",
        )
    return tuple(US_LAYOUT[char] for char in text)


def _check_hold_time(hold_time_ms: int | None) -> None:
    """:raise InvalidInput: ``hold_time_ms``: not a whole number from 1 to :data:`MAX_HOLD_TIME_MS`."""
    if hold_time_ms is None:
        return
    if isinstance(hold_time_ms, bool) or not isinstance(hold_time_ms, int) or not 1 <= hold_time_ms <= MAX_HOLD_TIME_MS:
        raise InvalidInput(
            "hold_time_ms",
            f"{hold_time_ms!r} must be a whole number of milliseconds from 1 to {MAX_HOLD_TIME_MS} "
            f"(or left out for QEMU's {DEFAULT_HOLD_TIME_MS} ms)",
        )


def send_key_arguments(combo: Sequence[str], hold_time_ms: int | None = None) -> dict[str, Any]:
    """The arguments of QMP ``send-key`` that press ``combo`` (qcodes, as the parsers return them).

    ``hold_time_ms`` is QEMU's delay after each press and release; None leaves it to QEMU (10 ms).

    :raise InvalidInput: ``keys``: ``combo`` is empty, too long, or holds a name that is not a
        qcode; ``hold_time_ms``: not a whole number from 1 to :data:`MAX_HOLD_TIME_MS`.
    """
    keys = tuple(combo)
    if not keys or len(keys) > MAX_KEYS_PER_COMBO:
        raise InvalidInput("keys", f"a combination presses 1 to {MAX_KEYS_PER_COMBO} keys, not {len(keys)}")
    unknown = [key for key in keys if not isinstance(key, str) or key not in KEY_NAMES]
    if unknown:
        raise InvalidInput("keys", _unknown_keys_message([str(key) for key in unknown], "-".join(map(str, keys))))
    _check_hold_time(hold_time_ms)
    arguments: dict[str, Any] = {"keys": [{"type": "qcode", "data": key} for key in keys]}
    if hold_time_ms is not None:
        arguments["hold-time"] = hold_time_ms
    return arguments


def combo_duration_ms(combo: Sequence[str], hold_time_ms: int | None = None) -> int:
    """How long (guest milliseconds) QEMU takes to play ``combo``: a delay after each press and release.

    A caller that sends combinations one after the other should wait about this long between
    them, or QEMU's keyboard queue overflows and drops keys without an error.
    """
    return 2 * len(combo) * (hold_time_ms or DEFAULT_HOLD_TIME_MS)
