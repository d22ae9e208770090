"""The VMs of a host that live outside its default vm_dir, so that they are found again by name.

The spec gives ``vm_dir`` to create and list_vms only: start, stop, delete, modify and the other tools must
still find ``web`` created in ``/data/vms``. VM names are unique per host, so a small index maps each such
name to its directory: ``<default vm_dir>/.index.json``, ``{"version": 1, "vms": {"web": "/data/vms"}}``,
rewritten whole (the host's atomic write) under a lock file of its own, by create and delete.

What the index says is checked like a client's ``vm_dir`` before use (the fence's roots); an entry whose VM is
gone is ignored, and dropped at the next change.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable

from ..errors import LimitExceeded
from ..hosts.base import Host
from .paths import LOCKS_DIR
from .spec import NAME_RE

__all__ = ["INDEX_FILE", "MAX_ENTRIES", "VMIndex"]

log = logging.getLogger(__name__)

INDEX_FILE = ".index.json"
#: Bounded: an index is read whole by calls without vm_dir.
MAX_ENTRIES = 10_000


class VMIndex:
    """The index of one host (in its default vm_dir ``default``)."""

    def __init__(self, host: Host, default: str, *, timeout: float, lock_timeout: float) -> None:
        self.host = host
        self.default = default.rstrip("/") or "/"
        self.path = posixpath.join(self.default, INDEX_FILE)
        self.lock_path = posixpath.join(self.default, LOCKS_DIR, INDEX_FILE + ".lock")
        self.timeout = timeout
        self.lock_timeout = lock_timeout

    async def entries(self) -> dict[str, str]:
        """``{name: vm_dir}``; an unreadable or malformed index is empty (and logged)."""
        raw = (await self.host.read_files([self.path], timeout=self.timeout))[self.path]
        if raw is None:
            return {}
        try:
            data = json.loads(raw)
            vms = data["vms"] if isinstance(data, dict) else None
            if not isinstance(vms, dict):
                raise ValueError("no vms object")
        except (ValueError, KeyError, RecursionError) as exc:
            log.warning("VM index %s on %s is unreadable (%s); ignoring it", self.path, self.host.name, exc)
            return {}
        return {
            name: _normal(directory)
            for name, directory in list(vms.items())[:MAX_ENTRIES]
            if isinstance(name, str) and NAME_RE.fullmatch(name) and _is_dir_path(directory)
        }

    async def lookup(self, name: str) -> str | None:
        """The vm_dir of ``name`` when it lives outside the default one."""
        directory = (await self.entries()).get(name)
        return directory if directory is not None and directory != self.default else None

    async def add(self, name: str, vm_dir: str) -> None:
        await self._update(lambda vms: vms.__setitem__(name, _normal(vm_dir)))

    async def remove(self, name: str, vm_dir: str) -> None:
        """Forget ``name`` if the index places it in ``vm_dir``."""
        if (await self.entries()).get(name) != _normal(vm_dir):
            return
        await self._update(lambda vms: vms.pop(name, None))

    async def _update(self, change: Callable[[dict[str, str]], object]) -> None:
        await self.host.run(["mkdir", "-p", "--", self.default], timeout=self.timeout)
        async with self.host.lock_file(self.lock_path, timeout=self.lock_timeout):
            vms = await self.entries()
            change(vms)
            if len(vms) > MAX_ENTRIES:
                raise LimitExceeded(f"more than {MAX_ENTRIES} VMs outside the default vm_dir of {self.host.name}")
            data = json.dumps({"version": 1, "vms": dict(sorted(vms.items()))}, indent=1).encode() + b"\n"
            await self.host.write_file(self.path, data, timeout=self.timeout)


def _is_dir_path(value: object) -> bool:
    return isinstance(value, str) and value.startswith("/") and len(value) < 4096 and "\0" not in value


def _normal(path: str) -> str:
    return posixpath.normpath(path)
