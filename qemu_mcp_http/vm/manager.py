"""VM operations on any host: create, start, stop, delete, modify, list, status, and the capabilities (guest,
console, screen, snapshots), put together.

These know a :class:`~qemu_mcp_http.hosts.base.Host`, never whether it is local or remote.

Nothing a VM's files say is trusted for a path: every disk and ISO a definition names is checked again
(see :mod:`.fence` and :mod:`..storage.disks`) before QEMU opens it, and delete removes only the files the
server manages plus a disk create made, while it is still the very file create made (its recorded identity).
"""

from __future__ import annotations

from ..console.screen import Screen
from ..console.serial import SerialConsole
from ..guest.ops import GuestOps
from ..storage.disks import DiskImages
from ..storage.snapshot import SnapshotOps
from .cleanup import CleanupOps
from .create import CreateOps
from .delete import DeleteOps
from .modify import ModifyOps
from .power import PowerOps
from .vmdir import VMDir, VMState

__all__ = ["VMManager", "VMState"]


class VMManager:
    """Every operation on the VMs of one ``vm_dir`` of one host.

    One object per concern, each given the :class:`VMDir` and the other operations it uses, all made here:
    the one place that knows them all. Callers use the operations through the names bound below.
    """

    def __init__(self, vms: VMDir) -> None:
        self.dir = vms
        # The directory itself: what list_vms, the resources and the confirmations read.
        self.host, self.vm_dir, self.settings, self.store = vms.host, vms.vm_dir, vms.settings, vms.store
        self.list, self.list_elsewhere, self.state_of, self.row = vms.list, vms.list_elsewhere, vms.state_of, vms.row

        disks = DiskImages(vms.host, vms.fence, vms.settings.command_timeout)
        cleanup = CleanupOps(vms)
        snapshots = SnapshotOps(vms, disks)
        self.power = PowerOps(vms, disks)
        # The lifecycle (manage_vm).
        self.create = CreateOps(vms, disks, cleanup).create
        self.start, self.stop = self.power.start, self.power.stop
        self.delete = DeleteOps(vms, cleanup, self.power, snapshots).delete
        self.modify = ModifyOps(vms, disks, self.power, snapshots).modify
        # Inside the guest (vm_guest).
        guest = GuestOps(vms)
        self.guest_exec, self.guest_info = guest.guest_exec, guest.guest_info
        self.guest_read_file, self.guest_write_file = guest.guest_read_file, guest.guest_write_file
        # The serial console and the screen (vm_console).
        serial, screen = SerialConsole(vms), Screen(vms)
        self.console_read, self.console_send, self.console_wait = (
            serial.console_read,
            serial.console_send,
            serial.console_wait,
        )
        self.console_screenshot, self.console_keys, self.console_type = (
            screen.console_screenshot, screen.console_keys, screen.console_type,
        )  # fmt: skip
        # Snapshots (vm_snapshot, and the vm:// resource).
        self.snapshot_list, self.snapshot_create = snapshots.snapshot_list, snapshots.snapshot_create
        self.snapshot_revert, self.snapshot_delete = snapshots.snapshot_revert, snapshots.snapshot_delete
        self.disk_snapshots = snapshots.disk_snapshots
