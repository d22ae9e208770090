"""Which SSH keys a call may name: files of this server, under ``--ssh-key-dirs`` (other paths: :mod:`..vm.fence`)."""

from __future__ import annotations

import os
import posixpath

from ..config import Settings
from ..errors import InvalidInput

__all__ = ["check_ssh_key"]


def check_ssh_key(settings: Settings, path: str) -> str:
    """An ``ssh_key`` names a file of this server: it must resolve under ``--ssh-key-dirs``.

    :raise InvalidInput: it does not.
    """
    if not path.startswith(("/", "~")):
        raise InvalidInput("ssh_key", f"{path!r} must be an absolute path")
    roots = tuple(posixpath.normpath(os.path.realpath(os.path.expanduser(p))) for p in settings.ssh_key_dirs)
    resolved = os.path.realpath(os.path.expanduser(path))
    if any(resolved == root or resolved.startswith(root.rstrip("/") + "/") for root in roots):
        return resolved
    raise InvalidInput(
        "ssh_key",
        f"{path!r} is outside the directories this server allows for keys ({', '.join(roots) or 'none'}); "
        "use a key under them or ask the operator to extend --ssh-key-dirs",
    )
