"""Removing what the server made, and only that: a disk create made (while it is still that file), the
files the server manages in a VM directory, and the directory when nothing else is left in it."""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import re
from typing import Any

from ..errors import (
    InvalidInput,
)
from .paths import MANAGED_NAMES, VMPaths
from .vmdir import VMDir

__all__ = ["CleanupOps", "temp_name_pattern"]

log = logging.getLogger(__name__)
#: Temporary files of the atomic writes of managed files (``.vm.json.<pid>.tmp`` and the like).
_MANAGED_TEMP = re.compile(r"\.(vm\.json|runtime\.json|\.create\.json)\.[A-Za-z0-9]+\.tmp|\.screen-[0-9a-f]+\.png")


class CleanupOps:
    """What create's undo and delete share."""

    def __init__(self, vms: VMDir) -> None:
        self.vms = vms

    async def is_our_file(self, path: str, identity: str | None, own_dir: str, *, default: str = "") -> bool:
        """Whether ``path`` is still the file create made there: inside the fence, and the same file.

        Definitions written before identities were recorded name none; of those, only the default disk
        inside the VM's own directory (a name nothing else could claim) counts as made by create.
        """
        try:
            await self.vms.fence.check("disk", path, own_dir=own_dir)
        except InvalidInput:
            return False
        if identity is None:
            st = await self.vms.host.stat(path, timeout=self.vms.settings.command_timeout)
            return path == default and st is not None and st.is_file
        found = (await self.vms.host.file_ids([path], timeout=self.vms.settings.command_timeout))[path]
        return found == identity

    async def read_journal(self, paths: VMPaths) -> dict[str, Any]:
        raw = (await self.vms.host.read_files([paths.journal], timeout=self.vms.settings.command_timeout))[
            paths.journal
        ]
        try:
            journal = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            return {}
        return journal if isinstance(journal, dict) else {}

    async def remove_disk_of_journal(
        self, paths: VMPaths, journal: dict[str, Any], kept: list[str], notes: list[str]
    ) -> list[str]:
        """Remove the disk (and its temporary file) an interrupted create made, as its journal records them."""
        removed: list[str] = []
        tmp, disk, identity = journal.get("tmp"), journal.get("disk"), journal.get("identity")
        # A temporary name is random and create's own: whatever is there was made by that create.
        ours = isinstance(tmp, str) and isinstance(disk, str) and tmp == temp_name_pattern(disk, tmp)
        if ours and await self.vms.host.stat(str(tmp), timeout=self.vms.settings.command_timeout) is not None:
            await self.vms.run("rm", "-f", "--", str(tmp))
            removed.append(str(tmp))
        if isinstance(disk, str) and await self.vms.host.stat(disk, timeout=self.vms.settings.command_timeout):
            if isinstance(identity, str) and await self.is_our_file(disk, identity, paths.directory):
                await self.vms.run("rm", "-f", "--", disk)
                removed.append(disk)
            else:
                kept.append(disk)
                notes.append(f"{disk} was not recorded as made by that create, so it was kept")
        return removed

    async def remove_made(self, paths: VMPaths, journal: dict[str, Any]) -> None:
        """Undo a create that failed in this process: its disk (as the journal records it), then its directory."""
        removed: list[str] = []
        await self.remove_disk_of_journal(paths, journal, [], [])
        await self.remove_vm_directory(paths, removed)

    async def remove_vm_directory(self, paths: VMPaths, removed: list[str]) -> list[str]:
        """Remove the managed files of ``paths.directory`` and the directory if nothing else is left.

        Returns what was kept (files the server did not make). Never follows a link: the directory was
        checked not to be one, and ``rm -f`` of a link inside removes the link.
        """
        timeout = self.vms.settings.command_timeout
        names = await self.vms.host.list_dir(paths.directory, timeout=timeout)
        ours = [n for n in names if n in MANAGED_NAMES or _MANAGED_TEMP.fullmatch(n)]
        if ours:
            targets = [f"{paths.directory}/{n}" for n in ours]
            stats = await asyncio.gather(*(self.vms.host.stat(t, timeout=timeout) for t in targets))
            files = [t for t, st in zip(targets, stats, strict=True) if st is not None and not st.is_dir]
            if files:
                await self.vms.run("rm", "-f", "--", *files)
        await self.vms.shared.qmp.forget(self.vms.host, paths.qmp_socket)
        left = await self.vms.run("rmdir", "--", paths.directory, check=False)
        if left.succeeded:
            removed.append(paths.directory)
            return []
        remaining = await self.vms.host.list_dir(paths.directory, timeout=timeout)
        return [f"{paths.directory}/{n}" for n in remaining]


def temp_name_pattern(disk: str, tmp: str) -> str:
    """``tmp`` when it is a name :func:`.disks.temp_name` gives for ``disk``, else ``""``."""
    directory, base = posixpath.split(disk)
    prefix = f"{directory}/.{base}."
    middle = tmp[len(prefix) : -len(".creating")] if tmp.startswith(prefix) and tmp.endswith(".creating") else ""
    return tmp if re.fullmatch(r"[0-9a-f]{12}", middle) else ""
