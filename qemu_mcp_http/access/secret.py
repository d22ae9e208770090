"""The replicas' shared secret (``--shared-secret-file``) and the keys derived from it, one per purpose: what one
replica seals (a multi-round call's state) or signs (a console link), any other opens."""

from __future__ import annotations

import hashlib
import hmac
import os

from ..config import Settings

__all__ = ["derive_key", "load_shared_secret"]


def load_shared_secret(settings: Settings) -> bytes | None:
    """The replicas' shared secret (``--shared-secret-file``), or ``None`` when none is set.

    :raise ValueError: the file cannot be read or holds fewer than 32 bytes (the message never shows it).
    """
    if not settings.shared_secret_file:
        return None
    try:
        with open(os.path.expanduser(settings.shared_secret_file), "rb") as f:
            secret = f.read(4096).strip()
    except OSError as exc:
        raise ValueError(f"cannot read shared secret file {settings.shared_secret_file}: {exc.strerror}") from None
    if len(secret) < 32:
        raise ValueError(
            f"shared secret file {settings.shared_secret_file} holds {len(secret)} bytes; give at least 32 "
            "(e.g. openssl rand -hex 32)"
        )
    return secret


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose from the shared secret (a leak of one key reveals nothing of the others)."""
    return hmac.new(secret, purpose.encode(), hashlib.sha256).digest()
