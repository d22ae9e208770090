"""VM operations on any host: create, start, stop, delete, modify, list, status, and the capabilities (guest,
console, screen, snapshots), put together.

These know a :class:`~qemu_mcp_http.hosts.base.Host`, never whether it is local or remote.

Nothing a VM's files say is trusted for a path: every disk and ISO a definition names is checked again
(see :mod:`.fence` and :mod:`..storage.disks`) before QEMU opens it, and delete removes only the files the
server manages plus a disk create made, while it is still the very file create made (its recorded identity).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..config import Settings
from ..console.screen import Screen
from ..console.serial import SerialConsole
from ..fleet.hosts import Fleet
from ..fleet.targets import HostRequest
from ..guest.ops import GuestOps
from ..storage.disks import DiskImages
from ..storage.snapshot import SnapshotOps
from .cleanup import CleanupOps
from .create import CreateOps
from .delete import DeleteOps
from .fence import Fence, FenceRules
from .index import VMIndex
from .modify import ModifyOps
from .power import PowerOps
from .shared import SharedState
from .spec import NAME_RE, validate_path
from .vmdir import VMDir, VMState

__all__ = ["VMManager", "VMManagers", "VMState"]


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


class VMManagers:
    """The :class:`VMManager` of a call: its host from the fleet, its vm_dir (the call's, the host's index's for a VM
    created elsewhere, or the host's default) checked against the host's roots."""

    def __init__(self, fleet: Fleet, settings: Settings, shared: SharedState) -> None:
        self.fleet = fleet
        self.settings = settings
        self.shared = shared

    def fence_rules(self, request: HostRequest) -> FenceRules:
        """The roots paths of a call may use on its host (see :mod:`.fence`)."""
        if request.is_local:
            s = self.settings
            roots = tuple(os.path.expanduser(r) for r in (s.allowed_roots or (s.vm_dir,)))
            return FenceRules(
                roots=roots,
                iso_roots=tuple(os.path.expanduser(r) for r in s.iso_dirs),
                image_roots=tuple(os.path.expanduser(r) for r in s.image_dirs),
            )
        name = (request.host or "").strip()
        entry = self.fleet.named_hosts.get(name)
        if entry is not None and entry.allowed_roots:
            return FenceRules(roots=entry.allowed_roots, source=name)
        return FenceRules(roots=None, source=request.display_name)

    @asynccontextmanager
    async def open(
        self, request: HostRequest, vm_dir: str | None, *, name: str | None = None
    ) -> AsyncIterator[VMManager]:
        """The VMs of ``vm_dir`` (default: the named host's, else the server's) on the call's host, the vm_dir
        checked against the host's roots (resolved there); every further path is checked by the manager as it
        uses it.

        ``name``: the VM the call is about; without ``vm_dir``, the host's index may place it elsewhere.

        :raise InvalidInput: bad host arguments, or a vm_dir outside the roots.
        :raise HostError: the host cannot be reached.
        """
        default = validate_path(self.fleet.default_vm_dir(request), "vm_dir")
        directory = validate_path(vm_dir, "vm_dir") if vm_dir else default
        async with self.fleet.host(request) as host:
            s = self.settings
            index = VMIndex(host, default, timeout=s.command_timeout, lock_timeout=s.lock_timeout)
            if vm_dir is None and name is not None and NAME_RE.fullmatch(name):
                # A VM created in another vm_dir is found by its name (see vm/index.py).
                directory = await index.lookup(name) or directory
            fence = Fence(host, self.fence_rules(request), s.command_timeout)
            if fence.rules.roots is not None:
                real = (await fence.resolve([directory]))[0]
                fence.check_roots("vm_dir", directory, real, "vm_dir")
            yield VMManager(VMDir(host, directory, s, self.shared, fence, index))
