"""SHA-512 crypt (``$6$...``), after Ulrich Drepper's specification, in pure Python.

Python's ``crypt`` module is deprecated (and gone in 3.13); cloud-init's ``passwd`` wants this hash, so a
password given to ``cloud_init`` is hashed here the moment it is parsed.
"""

from __future__ import annotations

import hashlib
import re
import secrets

__all__ = ["sha512_crypt"]

_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SALT_RE = re.compile(r"[./0-9A-Za-z]+")
_ROUNDS_DEFAULT = 5000
_ROUNDS_MIN = 1000
_ROUNDS_MAX = 999_999_999
_SALT_MAX = 16
#: The byte triples of the final digest, in the order the specification encodes them (b64_from_24bit).
_ENCODE_ORDER = (
    (0, 21, 42),
    (22, 43, 1),
    (44, 2, 23),
    (3, 24, 45),
    (25, 46, 4),
    (47, 5, 26),
    (6, 27, 48),
    (28, 49, 7),
    (50, 8, 29),
    (9, 30, 51),
    (31, 52, 10),
    (53, 11, 32),
    (12, 33, 54),
    (34, 55, 13),
    (56, 14, 35),
    (15, 36, 57),
    (37, 58, 16),
    (59, 17, 38),
    (18, 39, 60),
    (40, 61, 19),
    (62, 20, 41),
)


def _repeat_to(digest: bytes, length: int) -> bytes:
    """``digest`` repeated and cut to ``length`` bytes (the P and S sequences of the specification)."""
    return (digest * (length // len(digest) + 1))[:length]


def _b64_24bit(b2: int, b1: int, b0: int, count: int) -> str:
    """The crypt base-64 form of three bytes, least significant six bits first, ``count`` characters."""
    word = (b2 << 16) | (b1 << 8) | b0
    chars = []
    for _ in range(count):
        chars.append(_CRYPT_ALPHABET[word & 0x3F])
        word >>= 6
    return "".join(chars)


def _sha512_crypt_digest(key: bytes, salt: bytes, rounds: int) -> bytes:
    """Steps 1-21 of Drepper's SHA-512 crypt: the 64-byte digest for ``key``, ``salt`` and ``rounds``."""
    alternate = hashlib.sha512(key + salt + key).digest()
    ctx = hashlib.sha512(key + salt)
    remaining = len(key)
    while remaining > 64:
        ctx.update(alternate)
        remaining -= 64
    ctx.update(alternate[:remaining])
    bits = len(key)
    while bits:
        ctx.update(alternate if bits & 1 else key)
        bits >>= 1
    intermediate = ctx.digest()
    p_bytes = _repeat_to(hashlib.sha512(key * len(key)).digest(), len(key))
    s_bytes = _repeat_to(hashlib.sha512(salt * (16 + intermediate[0])).digest(), len(salt))
    # Round i hashes [P or C] [S if i % 3] [P if i % 7] [C or P]; the pattern repeats every 42 rounds,
    # so each round is one sha512() over prefix + C + suffix.
    prefixes: list[bytes] = []
    suffixes: list[bytes] = []
    for i in range(42):
        middle = (s_bytes if i % 3 else b"") + (p_bytes if i % 7 else b"")
        if i & 1:
            prefixes.append(p_bytes + middle)
            suffixes.append(b"")
        else:
            prefixes.append(b"")
            suffixes.append(middle + p_bytes)
    digest = intermediate
    sha512 = hashlib.sha512
    for i in range(rounds):
        j = i % 42
        digest = sha512(prefixes[j] + digest + suffixes[j]).digest()
    return digest


def sha512_crypt(password: str, salt: str | None = None, rounds: int = _ROUNDS_DEFAULT) -> str:
    """The SHA-512 crypt (``$6$``) hash of ``password``, as ``/etc/shadow``, ``mkpasswd`` and ``openssl passwd -6``.

    Implements Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512"
    specification.  ``salt`` defaults to 16 random characters of ``./0-9A-Za-z``
    (from :mod:`secrets`); a longer salt is cut to 16 characters, as the
    specification does.  ``rounds`` outside 1000..999999999 is clamped into that
    range, also as the specification does; any value other than the default 5000
    is written as ``rounds=N$`` into the result.

    :raise ValueError: ``salt`` is empty or holds a character outside ``./0-9A-Za-z``;
        ``password`` cannot be encoded as UTF-8 (a lone surrogate).
    """
    if salt is None:
        salt = "".join(secrets.choice(_CRYPT_ALPHABET) for _ in range(_SALT_MAX))
    elif not _SALT_RE.fullmatch(salt):
        raise ValueError("a SHA-512 crypt salt is 1-16 characters of ./0-9A-Za-z")
    salt = salt[:_SALT_MAX]
    rounds = min(max(rounds, _ROUNDS_MIN), _ROUNDS_MAX)
    digest = _sha512_crypt_digest(password.encode("utf-8"), salt.encode("ascii"), rounds)
    encoded = "".join(_b64_24bit(digest[a], digest[b], digest[c], 4) for a, b, c in _ENCODE_ORDER)
    encoded += _b64_24bit(0, 0, digest[63], 2)
    setting = f"rounds={rounds}$" if rounds != _ROUNDS_DEFAULT else ""
    return f"$6${setting}{salt}${encoded}"
