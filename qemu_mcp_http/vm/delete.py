"""delete: stop the VM, then remove only what the server made (see :mod:`.cleanup`)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ..errors import QemuMcpError, VMStateError
from ..storage.snapshot import SnapshotOps
from .cleanup import CleanupOps
from .power import PowerOps
from .spec import (
    VMDefinition,
    validate_name,
)
from .vmdir import VMDir

__all__ = ["DeleteOps"]

log = logging.getLogger(__name__)


class DeleteOps:
    """delete."""

    def __init__(self, vms: VMDir, cleanup: CleanupOps, power: PowerOps, snapshots: SnapshotOps) -> None:
        self.vms = vms
        self.cleanup = cleanup
        self.power = power
        self.snapshots = snapshots

    async def delete(self, name: str, timeout: float) -> dict[str, Any]:
        """Stop if running; remove the files the server manages and a disk create made, nothing else.

        A directory that still holds other files is kept (and named in ``kept``). A VM directory that is a
        symbolic link is removed as a link, never followed. An incomplete VM (a create cut short) is
        cleaned from its journal.
        """
        name = validate_name(name)
        timeout = self.vms.check_stop_timeout(timeout)
        async with self.vms.lock(name) as lock:
            paths = self.vms.store.paths(name)
            entry = await self.vms.store.entry(name)
            if entry.kind == "missing":
                lock.discard()
                await self.vms.store.load(name)  # raises the usual VMNotFound
            if entry.kind == "symlink":
                await self.vms.run("rm", "-f", "--", paths.directory)  # the link itself (rm never follows it)
                lock.discard()
                return {
                    "stopped_by": "not-a-vm",
                    "removed": [paths.directory],
                    "kept": [],
                    "note": f"{paths.directory} was a symbolic link, not a VM directory: only the link was removed",
                }
            if entry.definition is not None:
                clones = await self.vms.linked_clones_of(entry.definition)
                if clones:
                    raise VMStateError(
                        f"the disk of VM {name} is the base of linked clones ({', '.join(clones)}); "
                        "delete them first (nothing was changed)"
                    )
            method, _ = await self.power.stop_locked(name, timeout)
            removed: list[str] = []
            kept: list[str] = []
            notes: list[str] = []
            if entry.definition is not None:
                await self._delete_disk(entry.definition, removed, kept, notes)
            else:
                journal = await self.cleanup.read_journal(paths)
                removed += await self.cleanup.remove_disk_of_journal(paths, journal, kept, notes)
            leftover = await self.cleanup.remove_vm_directory(paths, removed)
            kept += [path for path in leftover if path not in kept]
            if leftover:
                notes.append(f"{paths.directory} still holds files the server did not make; they were kept")
            else:
                lock.discard()
                await self._forget_in_index(name)
        details: dict[str, Any] = {"stopped_by": method, "removed": removed, "kept": kept}
        if entry.kind != "vm":
            notes.insert(0, f"VM {name} was incomplete (a create cut short or an unreadable definition)")
        if notes:
            details["note"] = "; ".join(notes)
        return details

    async def _delete_disk(
        self, definition: VMDefinition, removed: list[str], kept: list[str], notes: list[str]
    ) -> None:
        disk = definition.disk
        paths = self.vms.store.paths(definition.name)
        if not disk.created_by_tool:
            kept.append(disk.path)
            return
        users = await self._other_users_of(definition.name, disk.path)
        if users:
            kept.append(disk.path)
            notes.append(f"the disk {disk.path} is also the disk of VM {', '.join(users)}; it was kept")
            return
        if await self.cleanup.is_our_file(disk.path, disk.identity, paths.directory, default=paths.default_disk()):
            snapshots: list[dict[str, Any]] = []
            if disk.format == "qcow2":
                with contextlib.suppress(QemuMcpError):  # only for the note: never a reason not to delete
                    snapshots, _ = await self.snapshots.disk_snapshots(definition, running=False)
            await self.vms.run("rm", "-f", "--", disk.path)
            removed.append(disk.path)
            if snapshots:
                names = ", ".join(s["name"] for s in snapshots[:10]) + (", ..." if len(snapshots) > 10 else "")
                notes.append(f"the disk's {len(snapshots)} internal snapshot(s) ({names}) went with it")
        else:
            kept.append(disk.path)
            notes.append(f"{disk.path} is no longer the file create made (or lies where no disk may), so it was kept")

    async def _forget_in_index(self, name: str) -> None:
        if self.vms.index is None or self.vms.vm_dir == self.vms.index.default:
            return
        try:
            await self.vms.index.remove(name, self.vms.vm_dir)
        except QemuMcpError as exc:  # a stale entry is ignored by lookups anyway
            log.warning("VM %s: not removed from the index of %s: %s", name, self.vms.host.name, exc.message)

    async def _other_users_of(self, name: str, disk_path: str) -> list[str]:
        scanned, _, _ = await self.vms.store.scan()
        return sorted(d.name for d, _ in scanned if d.name != name and d.disk.path == disk_path)
