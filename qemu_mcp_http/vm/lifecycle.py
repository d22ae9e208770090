"""VM operations on any host: create, start, stop, delete, modify, list, status.

These know a :class:`~qemu_mcp_http.hosts.base.Host`, never whether it is local or remote.

Nothing a VM's files say is trusted for a path: every disk and ISO a definition names is checked again
(see :mod:`.fence` and :mod:`.disks`) before QEMU opens it, and delete removes only the files the server
manages plus a disk create made, while it is still the very file create made (its recorded identity).
"""

from __future__ import annotations

from .console import ConsoleOps
from .create import CreateOps
from .delete import DeleteOps
from .guest import GuestOps
from .manager import VMState
from .modify import ModifyOps
from .snapshot import SnapshotOps

__all__ = ["VMManager", "VMState"]


class VMManager(CreateOps, DeleteOps, ModifyOps, GuestOps, ConsoleOps, SnapshotOps):
    """Operations on the VMs of one ``vm_dir`` of one host: one class per concern, put together here."""
