"""modify: memory, vCPUs, ports, cloud_init (a running VM restarts), a qcow2 disk grows; a failed change is
rolled back."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import (
    InvalidInput,
    QemuError,
    QemuMcpError,
)
from ..guest.cloudinit import CloudInitConfig, parse_cloud_init
from ..net.ports import PortForward, check_ports_network, parse_ports
from ..storage.disks import DiskImages
from ..storage.snapshot import SnapshotOps
from .create import GuestWanted
from .power import PowerOps
from .spec import (
    GIB,
    DiskDefinition,
    DiskSpec,
    VMDefinition,
    format_size,
    parse_disk,
    parse_memory_mib,
    validate_name,
    validate_vcpus,
)
from .vmdir import VMDir

__all__ = ["ModifyOps"]


@dataclass(frozen=True)
class _Wanted:
    """What a modify asks for, parsed (``None``: unchanged)."""

    memory_mib: int | None
    vcpus: int | None
    disk: DiskSpec | None
    ports: tuple[PortForward, ...] | None
    cloud_init: CloudInitConfig | None


class ModifyOps:
    """modify."""

    def __init__(self, vms: VMDir, disks: DiskImages, power: PowerOps, snapshots: SnapshotOps) -> None:
        self.vms = vms
        self.disks = disks
        self.power = power
        self.snapshots = snapshots

    async def modify(
        self,
        name: str,
        memory: str | None,
        vcpus: int | None,
        disk: str | None,
        timeout: float,
        *,
        ports: object = None,
        cloud_init: object = None,
    ) -> tuple[str, dict[str, Any]]:
        """Change memory, vcpus, ports or cloud_init, and/or grow the disk; a running VM restarts for all but the
        disk. A new cloud_init is written as a new seed with a new instance-id (cloud-init then runs again).

        A change that cannot be applied is rolled back: the previous definition is restored and a VM that
        was running is started again as it was; the error says what happened.
        """
        name = validate_name(name)
        timeout = self.vms.check_stop_timeout(timeout)
        wanted = self._parse(memory, vcpus, disk, ports, cloud_init)
        async with self.vms.lock(name) as lock:
            before = await self.vms.load_locked(name, lock)
            after, grow_to, seed = self._changed(before, wanted)
            if after == before:
                return f"VM {name} already has that configuration", {
                    "before": before.summary(),
                    "after": after.summary(),
                    "changed": [],
                }
            old = before.summary()
            changed = [k for k, v in after.summary().items() if old.get(k) != v]
            if seed is not None and "cloud_init" not in changed:
                changed.append("cloud_init")  # the same settings, a new seed: cloud-init runs again
            running = (await self.vms.state_of(before)).status == "running"
            needs_restart = running and (
                after.memory_mib != before.memory_mib
                or after.vcpus != before.vcpus
                or after.ports != before.ports
                or seed is not None
            )
            details: dict[str, Any] = {"before": before.summary(), "after": after.summary(), "changed": changed}
            if grow_to is not None:
                await self._check_growing(before, running, details)
            if needs_restart:
                await self._restart_with(before, after, grow_to, timeout, details, seed)
            else:
                await self._apply(before, after, grow_to, seed, running, details)
        note = " and restarted" if needs_restart else ""
        return f"VM {name} modified{note}: {', '.join(changed)}", details

    def _parse(
        self, memory: str | None, vcpus: int | None, disk: str | None, ports: object, cloud_init: object
    ) -> _Wanted:
        """:raise InvalidInput: nothing to change, or a value is malformed or beyond a limit (before any lock)."""
        s = self.vms.settings
        if memory is None and vcpus is None and not disk and ports is None and cloud_init is None:
            raise InvalidInput(
                "modify", "nothing to change; give memory, vcpus, ports, cloud_init and/or disk='size=40G'"
            )
        return _Wanted(
            memory_mib=parse_memory_mib(memory, s.max_memory_mib) if memory is not None else None,
            vcpus=validate_vcpus(vcpus, s.max_vcpus) if vcpus is not None else None,
            disk=parse_disk(disk, s.max_disk_gib * GIB) if disk else None,
            ports=parse_ports(ports) if ports is not None else None,
            cloud_init=parse_cloud_init(cloud_init) if cloud_init is not None else None,
        )

    def _changed(self, before: VMDefinition, wanted: _Wanted) -> tuple[VMDefinition, int | None, bytes | None]:
        """The definition after the change, the size the disk grows to, and a new cloud-init seed (``None``: the
        disk keeps its size; no new seed).

        :raise InvalidInput: the disk cannot change that way, or the ports do not fit the VM's network.
        """
        after = before
        if wanted.memory_mib is not None:
            after = after.evolve(memory_mib=wanted.memory_mib)
        if wanted.vcpus is not None:
            after = after.evolve(vcpus=wanted.vcpus)
        grow_to: int | None = None
        if wanted.disk is not None:
            grow_to = self._check_disk_change(before, wanted.disk.path, wanted.disk.format, wanted.disk.size_bytes)
            if grow_to is not None:
                after = after.evolve(disk=DiskDefinition(**{**before.disk.__dict__, "size_bytes": grow_to}))
        if wanted.ports is not None:
            check_ports_network(wanted.ports, before.network_spec)
            specs = tuple(f.spec() for f in wanted.ports)
            keys = {f"{f.proto}:{f.guest_port}" for f in wanted.ports if f.host_port is None}
            kept = {k: v for k, v in before.port_assignments.items() if k in keys}
            after = after.evolve(ports=specs, port_assignments=kept)
        seed: bytes | None = None
        if wanted.cloud_init is not None:
            instance_id = f"iid-{uuid.uuid4()}"
            seed = GuestWanted((), before.network_spec, wanted.cloud_init, "linked").seed(instance_id, before.name)
            after = after.evolve(cloud_init={"config": wanted.cloud_init.to_json(), "instance_id": instance_id})
        return after, grow_to, seed

    async def _check_growing(self, before: VMDefinition, running: bool, details: dict[str, Any]) -> None:
        """The disk that grows must still lie within the fence; its snapshots are noted (a revert brings back the
        size the disk had then)."""
        paths = self.vms.store.paths(before.name)
        await self.vms.fence.check("disk", before.disk.path, own_dir=paths.directory)
        snapshots, _ = await self.snapshots.disk_snapshots(before, running)
        if snapshots:
            details["note"] = (
                f"the disk holds {len(snapshots)} snapshot(s); qemu-img grows a qcow2 disk with snapshots, "
                "and a revert to one taken before this change brings back the size the disk had then"
            )

    async def _apply(
        self,
        before: VMDefinition,
        after: VMDefinition,
        grow_to: int | None,
        seed: bytes | None,
        running: bool,
        details: dict[str, Any],
    ) -> None:
        """A change that needs no restart: the seed written, the disk grown (live through QMP when the VM runs),
        the definition saved."""
        if seed is not None:
            seed_path = self.vms.store.paths(before.name).seed
            await self.vms.host.write_file(seed_path, seed, timeout=self.vms.settings.command_timeout)
        if grow_to is not None:
            if running:
                await self._block_resize(before, grow_to)
                details["disk_resized_by"] = "QMP block_resize"
            else:
                await self.disks.resize(before.disk.path, before.disk.format, grow_to)
                details["disk_resized_by"] = "qemu-img resize"
        await self.vms.store.save(after)
        details["restarted"] = False

    async def _restart_with(
        self,
        before: VMDefinition,
        after: VMDefinition,
        grow_to: int | None,
        timeout: float,
        details: dict[str, Any],
        seed: bytes | None = None,
    ) -> None:
        """Stop, apply, start; on failure restore ``before`` (with a disk already grown, and the old seed) and
        start it again.

        :raise QemuError: the change could not be applied; ``details`` says what was rolled back.
        """
        method, _ = await self.power.stop_locked(before.name, timeout)
        details["stopped_by"] = method
        restore = before
        seed_path = self.vms.store.paths(before.name).seed
        old_seed: bytes | None = None
        if seed is not None:
            old_seed, _ = await self.vms.host.read_range(
                seed_path, offset=0, length=16 << 20, timeout=self.vms.settings.command_timeout
            )
        try:
            if seed is not None:
                await self.vms.host.write_file(seed_path, seed, timeout=self.vms.settings.command_timeout)
            if grow_to is not None:
                await self.disks.resize(before.disk.path, before.disk.format, grow_to)
                details["disk_resized_by"] = "qemu-img resize"
                restore = before.evolve(disk=after.disk)  # a disk cannot shrink back: keep its new size
            await self.vms.store.save(after)
            await self.power.start_locked(after)
            details["restarted"] = True
        except QemuMcpError as failure:
            details["restarted"] = False
            details["rolled_back"] = True
            try:
                if old_seed:
                    await self.vms.host.write_file(seed_path, old_seed, timeout=self.vms.settings.command_timeout)
                await self.vms.store.save(restore)
                await self.power.start_locked(restore)
            except QemuMcpError as again:
                details["restored_definition"] = restore.summary()
                raise QemuError(
                    f"VM {before.name}: the change could not be applied ({failure.message}); the previous "
                    f"configuration was restored, but starting the VM with it failed too ({again.message}); "
                    "the VM is stopped",
                    details,
                ) from failure
            details["restored_definition"] = restore.summary()
            raise QemuError(
                f"VM {before.name}: the change could not be applied ({failure.message}); the previous "
                "configuration was restored and the VM started again as it was",
                details,
            ) from failure

    def _check_disk_change(
        self, before: VMDefinition, path: str | None, fmt: str | None, size: int | None
    ) -> int | None:
        disk = before.disk
        if path is not None and path != disk.path:
            raise InvalidInput("disk", f"modify cannot move the disk ({disk.path}); give only size=, e.g. size=40G")
        if fmt is not None and fmt != disk.format:
            raise InvalidInput("disk", f"modify cannot convert the disk from {disk.format} to {fmt}")
        if size is None or size == disk.size_bytes:
            return None
        if disk.format == "raw":
            raise InvalidInput(
                "disk",
                "raw disks cannot be resized by modify (the spec allows qcow2 only); grow the file by hand "
                "(qemu-img resize -f raw) while the VM is stopped",
            )
        if size < disk.size_bytes:
            raise InvalidInput(
                "disk",
                f"shrinking is refused (current {format_size(disk.size_bytes)}, asked {format_size(size)}); "
                "give a size larger than the current one",
            )
        return size

    async def _block_resize(self, definition: VMDefinition, size: int) -> None:
        async with self.vms.qmp(definition.name) as qmp:
            await qmp.execute("block_resize", {"node-name": "disk0-fmt", "size": size})
