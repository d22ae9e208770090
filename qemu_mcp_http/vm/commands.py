"""Where host errors become VM errors (httpx's ``map_httpcore_exceptions`` is the model).

Hosts raise transport errors only (:class:`.errors.HostError`); the VM layer knows which command was QEMU
and says so in the spec's words.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import CommandNotFound, QemuNotInstalled

__all__ = ["qemu_installed"]


@contextlib.contextmanager
def qemu_installed() -> Iterator[None]:
    """:raise QemuNotInstalled: for a missing ``qemu-*`` command (others pass as they are)."""
    try:
        yield
    except CommandNotFound as exc:
        if exc.command.startswith("qemu-"):
            raise QemuNotInstalled(exc.command, exc.host) from exc
        raise
