"""create: validate everything, make the disk, record the definition; undo on failure, journal for a crash."""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import (
    InvalidInput,
    QemuMcpError,
    VMExists,
    VMNotFound,
)
from ..guest.cloudinit import CloudInitConfig, build_seed_iso, hostname_for, parse_cloud_init
from ..hosts.base import FileLock
from ..net.ports import NetworkSpec, PortForward, check_ports_network, parse_network, parse_ports
from ..storage.disks import DiskImages, ImageLayer, temp_name
from .cleanup import CleanupOps
from .paths import UNIX_PATH_MAX, VMPaths
from .spec import (
    GIB,
    DiskDefinition,
    DiskSpec,
    VMDefinition,
    disk_format_for,
    format_size,
    parse_arch,
    parse_disk,
    parse_memory_mib,
    validate_name,
    validate_path,
    validate_vcpus,
)
from .store import VMStore
from .vmdir import VMDir, now

__all__ = ["CreateOps", "GuestAccess"]

log = logging.getLogger(__name__)

DEFAULT_DISK_BYTES = 20 * GIB


def _random_mac() -> str:
    # 52:54:00 is QEMU's locally administered prefix, as libvirt uses.
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@dataclass(frozen=True)
class ImageSource:
    """The image a new disk is made from, inspected."""

    layer: ImageLayer
    #: The VM whose disk it is (``vm:<name>``), if any.
    vm: str | None

    def record(self, clone: str) -> dict[str, Any]:
        return {"path": self.layer.path, "format": self.layer.format, "clone": clone, "vm": self.vm}


@dataclass(frozen=True)
class GuestWanted:
    """The guest-access arguments of create, parsed."""

    ports: tuple[PortForward, ...]
    network: NetworkSpec
    cloud_init: CloudInitConfig | None
    clone: Literal["linked", "full"]

    def seed(self, instance_id: str, name: str) -> bytes | None:
        """The NoCloud seed ISO, built in memory (uploaded as it is to a remote host)."""
        if self.cloud_init is None:
            return None
        hostname = self.cloud_init.hostname or hostname_for(name)
        return build_seed_iso(self.cloud_init, instance_id=instance_id, hostname=hostname)

    def stored_cloud_init(self, instance_id: str) -> dict[str, Any] | None:
        if self.cloud_init is None:
            return None
        return {"config": self.cloud_init.to_json(), "instance_id": instance_id}


@dataclass(frozen=True)
class GuestAccess:
    """What create may add to a VM so that people can get into it: a disk made from an image (a linked clone
    or a full copy), a cloud-init seed, port forwards, and the kind of network. Raw client values."""

    image: str | None = None
    clone: str = "linked"
    cloud_init: object = None
    ports: object = None
    network: object = None

    def parse(self) -> GuestWanted:
        """:raise InvalidInput: any of them is malformed (before anything is written)."""
        if self.clone not in ("linked", "full"):
            raise InvalidInput("clone", f"{self.clone!r} is not a clone kind; use 'linked' (default) or 'full'")
        cloud_init = parse_cloud_init(self.cloud_init) if self.cloud_init is not None else None
        ports = parse_ports(self.ports) if self.ports is not None else ()
        network = parse_network(self.network)
        check_ports_network(ports, network)
        clone: Literal["linked", "full"] = "full" if self.clone == "full" else "linked"
        return GuestWanted(ports, network, cloud_init, clone)


@dataclass(frozen=True)
class _Plan:
    """What a create makes, from its arguments, validated before anything is touched on the host."""

    paths: VMPaths
    name: str
    wanted: GuestWanted
    image: str | None
    arch: Literal["x86_64", "arm64"]
    memory_mib: int
    vcpus: int
    iso: str | None
    disk: DiskSpec
    disk_path: str
    disk_format: Literal["qcow2", "raw"]


class CreateOps:
    """create."""

    def __init__(self, vms: VMDir, disks: DiskImages, cleanup: CleanupOps) -> None:
        self.vms = vms
        self.disks = disks
        self.cleanup = cleanup

    async def create(
        self,
        name: str,
        arch: str | None,
        memory: str | None,
        vcpus: int | None,
        disk: str | None,
        iso: str | None,
        access: GuestAccess | None = None,
    ) -> dict[str, Any]:
        """Validate everything, make the disk, record the definition. Does not start the VM.

        On any failure nothing is left behind: what the call made is removed, and only that.
        A create cut short by a crash leaves a journal that lets delete remove what it made.

        :raise InvalidInput: an argument is malformed, beyond a limit, or names a path it may not.
        :raise VMExists: the name is taken on the host.
        """
        s = self.vms.settings
        name = validate_name(name)
        arch_ = parse_arch(arch)
        memory_mib = parse_memory_mib(memory if memory is not None else "2G", s.max_memory_mib)
        vcpus_ = validate_vcpus(vcpus if vcpus is not None else 2, s.max_vcpus)
        disk_spec = parse_disk(disk, s.max_disk_gib * GIB)
        iso_path = validate_path(iso, "iso") if iso else None
        paths = self.vms.store.paths(name)
        if len(paths.console_socket.encode()) > UNIX_PATH_MAX:  # the longest socket path of a VM
            raise InvalidInput(
                "vm_dir",
                f"{self.vms.vm_dir!r} is too deep: the QMP socket path would exceed {UNIX_PATH_MAX} bytes",
            )
        disk_path = disk_spec.path or paths.default_disk()
        disk_format = disk_format_for(disk_path, disk_spec.format)
        access = access or GuestAccess()
        wanted = access.parse()
        if wanted.clone == "linked" and access.image is not None:
            if disk_spec.format == "raw":
                raise InvalidInput("disk", "a linked clone is a qcow2 overlay; drop format=raw or use clone='full'")
            disk_format = "qcow2"
        plan = _Plan(
            paths, name, wanted, access.image, arch_, memory_mib, vcpus_, iso_path, disk_spec, disk_path, disk_format
        )
        base = await self._check_on_host(plan)
        vm_uuid = str(uuid.uuid4())
        seed = wanted.seed(f"iid-{vm_uuid}", name)
        async with self.vms.lock(plan.name) as lock:
            await self._claim_directory(plan)
            definition = await self._make(plan, base, vm_uuid, seed, lock)
        return await self._created(plan, definition)

    async def _make(
        self, plan: _Plan, base: ImageSource | None, vm_uuid: str, seed: bytes | None, lock: FileLock
    ) -> VMDefinition:
        """Under the VM's lock, in its new directory: the journal, the seed, the disk, the UEFI variables, then
        the definition; on any failure, what the journal says was made is removed (and only that)."""
        paths, timeout = plan.paths, self.vms.settings.command_timeout
        journal: dict[str, Any] = {"started_at": now()}
        try:
            await self._write_journal(paths, journal)
            if seed is not None:
                await self.vms.host.write_file(paths.seed, seed, timeout=timeout)
            disk_def = await self._make_disk(plan, base, journal)
            if plan.arch == "arm64":
                await self.disks.prepare_efi_vars(paths.efi_vars)
            definition = VMDefinition(
                name=plan.name,
                arch=plan.arch,
                memory_mib=plan.memory_mib,
                vcpus=plan.vcpus,
                disk=disk_def,
                iso=plan.iso,
                uuid=vm_uuid,
                mac=_random_mac(),
                created_at=now(),
                machine="q35" if plan.arch == "x86_64" else "virt",
                ports=tuple(f.spec() for f in plan.wanted.ports),
                network=plan.wanted.network.spec(),
                cloud_init=plan.wanted.stored_cloud_init(f"iid-{vm_uuid}"),
                image=base.record(plan.wanted.clone) if base is not None else None,
            )
            await self.vms.store.save(definition)
            await self.vms.run("rm", "-f", "--", paths.journal)
        except BaseException:
            lock.discard()
            await asyncio.shield(self._undo_create(paths, journal))
            raise
        return definition

    async def _check_on_host(self, plan: _Plan) -> ImageSource | None:
        """What the plan names on the host: the vm_dir, the disk and the ISO within the fence, the image it clones
        (inspected; returned), and the name free on the whole host.

        :raise InvalidInput: a path breaks the fence, or the image is not safe or smaller than the disk asked.
        :raise VMExists: the name is taken on the host.
        """
        fence, paths = self.vms.fence, plan.paths
        await fence.check("vm_dir", self.vms.vm_dir)
        if plan.disk.path is not None:
            await fence.check("disk", plan.disk_path, own_dir=paths.directory)
        if plan.iso is not None:
            await self.vms.check_iso(plan.iso)
        base = await self._image_source(plan.image, paths) if plan.image is not None else None
        size = plan.disk.size_bytes
        if base is not None and size is not None and size < base.layer.virtual_size:
            raise InvalidInput(
                "disk",
                f"size= may only grow the image, which is {format_size(base.layer.virtual_size)}; "
                "give a larger size or none",
            )
        await self._check_unique_on_host(plan.name)
        return base

    async def _claim_directory(self, plan: _Plan) -> None:
        """Make the VM's directory, which must not exist yet (under the VM's lock).

        :raise VMExists: it exists (a VM, or what a create cut short left).
        """
        paths, host = plan.paths, self.vms.host
        await self.vms.run("mkdir", "-p", "--", self.vms.vm_dir)
        claimed = await self.vms.run("mkdir", "--", paths.directory, check=False)
        if claimed.succeeded:
            return
        if await host.stat(paths.definition, timeout=self.vms.settings.command_timeout) is not None:
            raise VMExists(f"VM {plan.name} already exists on {host.name}; delete it first or use another name")
        raise VMExists(
            f"{paths.directory} already exists on {host.name} but holds no VM definition "
            "(a create cut short? delete removes what it made); remove it or use another name"
        )

    async def _make_disk(self, plan: _Plan, base: ImageSource | None, journal: dict[str, Any]) -> DiskDefinition:
        """Attach the existing disk the plan names, or make a new one (empty, a linked clone or a copy of the
        image) beside a temporary name recorded in the ``journal`` first, then its identity."""
        s, host, path = self.vms.settings, self.vms.host, plan.disk_path
        existing = await host.stat(path, timeout=s.command_timeout)
        if existing is not None and base is not None:
            raise InvalidInput("disk", f"{path} exists; a disk made from an image needs a new path")
        if existing is not None:
            own_dir = plan.paths.directory
            return await self.disks.attach_existing(path, plan.disk.format, plan.disk.size_bytes, own_dir=own_dir)
        parent = posixpath.dirname(path) or "/"
        if await host.stat(parent, timeout=s.command_timeout) is None:
            raise InvalidInput("disk", f"directory {parent} does not exist on {host.name}")
        size = plan.disk.size_bytes or (base.layer.virtual_size if base else DEFAULT_DISK_BYTES)
        journal.update(disk=path, tmp=temp_name(path))
        await self._write_journal(plan.paths, journal)
        tmp = journal["tmp"]
        if base is None:
            identity = await self.disks.create(path, plan.disk_format, size, tmp=tmp)
        elif plan.wanted.clone == "linked":
            identity = await self.disks.create_overlay(path, base.layer, size, tmp=tmp)
        else:
            copy_timeout = s.image_copy_timeout
            identity = await self.disks.copy(path, plan.disk_format, base.layer, size, tmp=tmp, timeout=copy_timeout)
        journal["identity"] = identity
        await self._write_journal(plan.paths, journal)
        return DiskDefinition(path, plan.disk_format, size, created_by_tool=True, identity=identity)

    async def _created(self, plan: _Plan, definition: VMDefinition) -> dict[str, Any]:
        """The answer's details; a VM outside the host's default vm_dir is added to its index (a failure there
        only means calls must name the vm_dir, and the details say so)."""
        vms = self.vms
        details = {"vm_dir": vms.vm_dir, "directory": plan.paths.directory, **definition.summary()}
        if vms.index is not None and vms.vm_dir != vms.index.default:
            try:
                await vms.index.add(plan.name, vms.vm_dir)
            except QemuMcpError as exc:  # the VM exists; only finding it without vm_dir is at stake
                log.warning("VM %s: not added to the index of %s: %s", plan.name, vms.host.name, exc.message)
                details["note"] = f"calls must give vm_dir={vms.vm_dir} to find it (the host's index: {exc.message})"
        if not definition.disk.created_by_tool:
            details["disk_attached"] = "existing disk attached; delete will keep it"
        return details

    async def _check_unique_on_host(self, name: str) -> None:
        """VM names are unique per host: not in the default vm_dir when creating elsewhere, and not elsewhere
        (the index) when creating in another directory.

        :raise VMExists: the name is taken (the message says where).
        """
        index = self.vms.index
        if index is None:
            return
        if self.vms.vm_dir != index.default:
            default_store = VMStore(self.vms.host, index.default, self.vms.settings.command_timeout)
            if (await default_store.entry(name)).kind != "missing":
                raise VMExists(
                    f"VM {name} already exists in {index.default} on {self.vms.host.name} (VM names are unique per "
                    "host); use another name"
                )
        elsewhere = (await index.entries()).get(name)
        if elsewhere is not None and elsewhere != self.vms.vm_dir:
            other = VMStore(self.vms.host, elsewhere, self.vms.settings.command_timeout)
            if (await other.entry(name)).kind != "missing":
                raise VMExists(
                    f"VM {name} already exists in {elsewhere} on {self.vms.host.name} (VM names are unique per host); "
                    "use another name"
                )

    async def _image_source(self, image: str, paths: VMPaths) -> ImageSource:
        """The image a disk is made from: a file under the image roots, or ``vm:<name>``, the disk of a
        stopped VM of the same vm_dir; its chain inspected like a disk's.

        :raise InvalidInput: not a safe image, or the VM is missing or running.
        """
        if image.startswith("vm:"):
            source_name = validate_name(image[3:])
            try:
                source = await self.vms.store.load(source_name)
            except VMNotFound as exc:
                raise InvalidInput("image", f"{image}: {exc.message}") from exc
            if (await self.vms.state_of(source)).status == "running":
                raise InvalidInput("image", f"VM {source_name} is running; stop it before cloning its disk")
            path, fmt, vm = source.disk.path, source.disk.format, source_name
        else:
            path, fmt, vm = validate_path(image, "image"), None, None
        real = await self.vms.fence.check("image", path, field="image")
        st = await self.vms.host.stat(real, timeout=self.vms.settings.command_timeout)
        if st is None or not st.is_file:
            raise InvalidInput("image", f"{image} does not exist on {self.vms.host.name} or is not a regular file")
        layer = (await self.disks.inspect(path, fmt, own_dir=paths.directory, field="image"))[0]
        return ImageSource(layer, vm)

    async def _write_journal(self, paths: VMPaths, journal: dict[str, Any]) -> None:
        data = json.dumps(journal, sort_keys=True).encode() + b"\n"
        await self.vms.host.write_file(paths.journal, data, timeout=self.vms.settings.command_timeout)

    async def _undo_create(self, paths: VMPaths, journal: dict[str, Any]) -> None:
        try:
            await self.cleanup.remove_made(paths, journal)
        except QemuMcpError:
            log.exception("could not undo the partial create of %s on %s", paths.name, self.vms.host.name)
