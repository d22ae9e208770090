"""Where the paths of a VM may point, checked on the host where they live.

Paths reach the server from clients (``vm_dir``, ``disk``, ``iso``, an image's backing files) and from
files it keeps (``vm.json``), which anything with write access to the host may have changed.  Each one is
resolved on its host (symbolic links, ``..``) and then:

- must lie under the host's allowed roots (``--allowed-roots`` locally, plus ``--iso-dirs`` for ISOs; a
  named SSH host's ``allowed_roots``; an SSH host without them is fenced by its account's rights only);
- may not lie in a ``.locks`` directory, nor carry the name of a file the server manages (``vm.json``,
  ``qemu.pid``, ...);
- may not lie inside a VM directory other than the VM's own: another VM's files are never its disk or
  its ISO, and a ``vm_dir`` inside a VM directory would nest one VM's files in another's (an image, which is
  only read, may be another VM's disk: a linked clone of it).
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidInput
from ..hosts.base import Host
from .paths import LOCKS_DIR, MANAGED_NAMES, VM_DIR_MARKERS

__all__ = ["Fence", "FenceRules", "PathKind", "within"]

PathKind = Literal["vm_dir", "disk", "iso", "image"]


def within(path: str, roots: Sequence[str]) -> bool:
    """Whether resolved ``path`` is one of resolved ``roots`` or lies under one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


@dataclass(frozen=True)
class FenceRules:
    """The roots of one host, as configured (resolved on the host when a call checks a path)."""

    #: Roots of vm_dir and disks; ``None``: no fence but the host account's own rights.
    roots: tuple[str, ...] | None
    #: Further roots ISOs may come from.
    iso_roots: tuple[str, ...] = ()
    #: Further roots disk images (and their backing files) may come from.
    image_roots: tuple[str, ...] = ()
    #: Where the roots come from, for messages ("this server", "lab").
    source: str = "this server"

    def roots_for(self, kind: PathKind) -> tuple[str, ...] | None:
        if self.roots is None:
            return None
        return self.roots + {"iso": self.iso_roots, "image": self.image_roots}.get(kind, ())


class Fence:
    """Checks paths of one call on one host; resolves the configured roots once per call."""

    def __init__(self, host: Host, rules: FenceRules, timeout: float) -> None:
        self.host = host
        self.rules = rules
        self.timeout = timeout
        self._resolved_roots: tuple[str, ...] | None = None
        self._resolved_extra: dict[str, tuple[str, ...]] = {}

    async def resolve(self, paths: Sequence[str]) -> list[str]:
        """``paths`` resolved on the host; the roots are resolved in the same host operation the first time."""
        rules = self.rules
        roots: list[str] = []
        if rules.roots is not None and self._resolved_roots is None:
            roots = [*rules.roots, *rules.iso_roots, *rules.image_roots]
        resolved = await self.host.realpath([*roots, *paths], timeout=self.timeout)
        if roots:
            n, m = len(rules.roots or ()), len(rules.iso_roots)
            self._resolved_roots = tuple(resolved[:n])
            self._resolved_extra = {"iso": tuple(resolved[n : n + m]), "image": tuple(resolved[n + m : len(roots)])}
        return resolved[len(roots) :]

    async def check(self, kind: PathKind, path: str, *, own_dir: str | None = None, field: str | None = None) -> str:
        """Resolve ``path`` and apply every rule of the module docstring; return the resolved path.

        :param own_dir: the directory of the VM the path belongs to (its files may lie there).
        :param field: the argument named in the error (default: ``kind``).
        :raise InvalidInput: the path breaks a rule; the message says which and what to do.
        """
        name = field or kind
        real, *own = await self.resolve([path, *([own_dir] if own_dir else [])])
        self.check_roots(kind, path, real, name)
        parts = real.split("/")
        if LOCKS_DIR in parts:
            raise InvalidInput(name, f"{path} lies in a {LOCKS_DIR} directory, which holds the server's lock files")
        if kind != "vm_dir" and posixpath.basename(real) in MANAGED_NAMES:
            raise InvalidInput(
                name, f"{path} has the name of a file the server manages in VM directories; use another file"
            )
        if kind == "image":
            # An image is only read (a backing file, or copied): another VM's disk may be one (a linked clone of
            # it); QEMU's image locking keeps a running VM's disk out, and its owner then cannot go away.
            return real
        owner = await self.vm_directory_holding(real, own_dir=own[0] if own else None, include_self=kind == "vm_dir")
        if owner is not None:
            what = "a vm_dir" if kind == "vm_dir" else "this file"
            raise InvalidInput(
                name,
                f"{path} lies inside the directory of a VM ({owner}): {what} may not be part of another VM's "
                "files; use a path outside every VM directory",
            )
        return real

    def check_roots(self, kind: PathKind, given: str, real: str, field: str) -> None:
        """:raise InvalidInput: ``real`` (resolved ``given``) lies outside the roots of ``kind``."""
        if self.rules.roots is None:
            return
        roots = (self._resolved_roots or ()) + self._resolved_extra.get(kind, ())
        if not within(real, roots):
            allowed = ", ".join(self.rules.roots_for(kind) or ()) or "(none configured)"
            if self.rules.source == "this server":
                where = f"the directories this server allows ({allowed})"
                fix = "use a path under them or ask the operator to extend the allowed roots"
            else:
                where = f"the directories allowed on {self.rules.source} ({allowed})"
                fix = "use a path under one of them"
            raise InvalidInput(field, f"{given!r} is outside {where}; {fix}")

    async def vm_directory_holding(self, real: str, *, own_dir: str | None, include_self: bool) -> str | None:
        """The VM directory (other than resolved ``own_dir``) that ``real`` lies in, or ``None``.

        A VM directory is one that holds a definition or a create journal; every ancestor is asked at once
        (one pipelined round trip over SSH).
        """
        own = posixpath.normpath(own_dir) if own_dir else None
        candidates: list[str] = []
        directory = real if include_self else posixpath.dirname(real)
        while True:
            if directory != own:
                candidates.append(directory)
            parent = posixpath.dirname(directory)
            if parent == directory:
                break
            directory = parent
        probes = [(d, f"{d.rstrip('/')}/{marker}") for d in candidates for marker in VM_DIR_MARKERS]
        stats = await asyncio.gather(*(self.host.stat(p, timeout=self.timeout) for _, p in probes))
        for (directory, _), st in zip(probes, stats, strict=True):
            if st is not None:
                return directory
        return None
