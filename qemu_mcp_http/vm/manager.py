"""VM operations on any host: create, start, stop, delete, modify, list, status.

These know a :class:`~qemu_mcp_http.hosts.base.Host`, never whether it is local or remote.

Nothing a VM's files say is trusted for a path: every disk and ISO a definition names is checked again
(see :mod:`.fence` and :mod:`.disks`) before QEMU opens it, and delete removes only the files the server
manages plus a disk create made, while it is still the very file create made (its recorded identity).
"""

from __future__ import annotations

from ..console.serial import ConsoleOps
from ..errors import QemuMcpError
from ..guest.ops import GuestOps
from ..storage.snapshot import SnapshotOps
from .create import CreateOps
from .delete import DeleteOps
from .modify import ModifyOps
from .spec import VMDefinition
from .vmdir import VMState

__all__ = ["VMManager", "VMState"]


class VMManager(CreateOps, DeleteOps, ModifyOps, GuestOps, ConsoleOps, SnapshotOps):
    """Operations on the VMs of one ``vm_dir`` of one host: one class per concern, put together here."""

    async def list_elsewhere(self) -> tuple[list[tuple[str, VMDefinition, VMState]], list[str]]:
        """The VMs the host's index places outside this (default) vm_dir: ``(vm_dir, definition, state)``,
        and the directories that could not be listed (with why). Entries whose VM is gone are left out."""
        if self.index is None or self.vm_dir != self.index.default:
            return [], []
        by_dir: dict[str, set[str]] = {}
        for name, directory in (await self.index.entries()).items():
            if directory != self.vm_dir:
                by_dir.setdefault(directory, set()).add(name)
        found: list[tuple[str, VMDefinition, VMState]] = []
        problems: list[str] = []
        for directory, names in sorted(by_dir.items()):
            try:
                await self.fence.check("vm_dir", directory)
                other = VMManager(self.host, directory, self.settings, self.shared, self.fence, self.index)
                listed, _ = await other.list()
            except QemuMcpError as exc:
                problems.append(f"{directory}: {exc.message}")
                continue
            found += [(directory, d, state) for d, state in listed if d.name in names]
        return found, problems
