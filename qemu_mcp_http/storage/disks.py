"""Disk images on a host: qemu-img, and the inspection that comes before QEMU may open an image.

QEMU never probes a format here: every ``-drive`` names one, and an image is accepted only after
``qemu-img info`` has been asked about each file of its chain *one at a time*, so that no file is
opened before it has been checked (``--backing-chain`` would open every backing file first).  A chain is
refused when it holds a format other than qcow2/raw, a backing file whose format is not recorded in
the image (QEMU would probe it, and a guest can write any header into a raw disk), a reference that is
not a plain path (``json:``, ``nbd:``, ...), or a file outside the fence (see :mod:`..vm.fence`).

``qemu-img info`` runs without ``-U``: an image that a running QEMU is writing is refused ("in use"),
which also closes the window between this check and QEMU opening the image (QEMU's image locking
keeps a second writer out).
"""

from __future__ import annotations

import json
import logging
import posixpath
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import CommandFailed, InvalidInput, QemuError
from ..hosts.base import CommandResult, Host
from ..vm.argv import ARM64_FIRMWARE, FirmwarePaths
from ..vm.commands import qemu_installed
from ..vm.fence import Fence
from ..vm.spec import DiskDefinition, format_size

__all__ = ["MAX_CHAIN", "DiskImages", "ImageLayer", "is_plain_reference", "temp_name"]

log = logging.getLogger(__name__)

#: Longest backing chain accepted.
MAX_CHAIN = 16
FORMATS = ("qcow2", "raw")


def is_plain_reference(name: str) -> bool:
    """Whether QEMU reads ``name`` as a file path: not ``json:...``, and no ``protocol:`` before the first
    ``/`` (QEMU's own rule, ``path_has_protocol``)."""
    if name.startswith("json:") or not name:
        return False
    head = name.split("/", 1)[0]
    return ":" not in head


@dataclass(frozen=True)
class ImageLayer:
    """One file of an image's chain, as ``qemu-img info`` described it."""

    path: str
    format: Literal["qcow2", "raw"]
    virtual_size: int
    backing: str | None = None
    backing_format: str | None = None
    data_file: str | None = None


class DiskImages:
    """qemu-img on one host, every image checked against ``fence`` first."""

    def __init__(self, host: Host, fence: Fence, timeout: float) -> None:
        self.host = host
        self.fence = fence
        self.timeout = timeout

    async def qemu_img(self, *args: str) -> CommandResult:
        """:raise QemuError: qemu-img failed (its own words). :raise QemuNotInstalled: it is missing."""
        try:
            with qemu_installed():
                return await self.host.run(["qemu-img", *args], timeout=self.timeout)
        except CommandFailed as exc:
            raise QemuError(f"qemu-img {args[0]} failed: {exc.stderr.strip()}") from exc

    async def info(self, path: str, fmt: str | None, *, field: str = "disk", shared: bool = False) -> dict[str, Any]:
        """``qemu-img info`` of one file (never its backing files).

        :param fmt: the format to open it as; ``None`` probes it (qemu-img reads the header, nothing else).
        :param shared: ``-U``, for an image that its own running VM holds (sizes only, never for a check).
        :raise InvalidInput: the file is not an image qemu-img can open as ``fmt``, or a running QEMU holds it.
        """
        args = ["info", "--output=json", *(["-U"] if shared else []), *(["-f", fmt] if fmt else []), path]
        try:
            with qemu_installed():
                result = await self.host.run(["qemu-img", *args], timeout=self.timeout)
        except CommandFailed as exc:
            detail = exc.stderr.strip()
            if "lock" in detail.lower():
                raise InvalidInput(
                    field,
                    f"{path} is in use by a running QEMU (it holds the image's write lock); stop the VM using it",
                ) from exc
            raise InvalidInput(field, f"{path} cannot be opened as {fmt or 'a disk image'}: {detail}") from exc
        try:
            info = json.loads(result.stdout)
        except ValueError as exc:
            raise QemuError(f"qemu-img info {path}: unreadable output") from exc
        if not isinstance(info, dict):
            raise QemuError(f"qemu-img info {path}: unexpected output")
        return info

    async def inspect(
        self, path: str, fmt: str | None, *, own_dir: str | None, field: str = "disk"
    ) -> list[ImageLayer]:
        """The chain of ``path`` (itself first), each file checked before the next is looked at.

        ``path`` itself must already have passed the fence (the caller knows its kind); its backing files
        are fenced as images (they may be another VM's disk: a linked clone), an external data file as a disk.

        :param fmt: the format the definition records (``None``: probe, for a disk being attached).
        :raise InvalidInput: a rule of the module docstring is broken; the message names the file and the rule.
        """
        layers: list[ImageLayer] = []
        current, current_fmt = path, fmt
        while True:
            if len(layers) == MAX_CHAIN:
                raise InvalidInput(field, f"{path} has a backing chain longer than {MAX_CHAIN} files")
            layer = self._layer(current, current_fmt, await self.info(current, current_fmt, field=field), field)
            layers.append(layer)
            if layer.data_file is not None:
                await self.fence.check("disk", layer.data_file, own_dir=own_dir, field=field)
            if layer.backing is None:
                return layers
            await self.fence.check("image", layer.backing, field=field)
            current, current_fmt = layer.backing, layer.backing_format

    def _layer(self, path: str, fmt: str | None, info: dict[str, Any], field: str) -> ImageLayer:
        found = info.get("format")
        if found not in FORMATS:
            raise InvalidInput(field, f"{path} is a {found!r} image; only qcow2 and raw images are supported")
        if fmt is not None and found != fmt:
            raise InvalidInput(field, f"{path} is {found}, not {fmt} as recorded")
        directory = posixpath.dirname(path)
        data_file: str | None = None
        specific = info.get("format-specific")
        data = specific.get("data") if isinstance(specific, dict) else None
        if isinstance(data, dict) and data.get("data-file"):
            name = str(data["data-file"])
            if not is_plain_reference(name):
                raise InvalidInput(field, f"{path} names an external data file that is not a plain path ({name!r})")
            data_file = posixpath.normpath(posixpath.join(directory, name))
        backing_name = info.get("backing-filename")
        backing: str | None = None
        backing_format: str | None = None
        if backing_name:
            name = str(backing_name)
            if not is_plain_reference(name):
                raise InvalidInput(field, f"{path} names a backing file that is not a plain path ({name!r})")
            backing_format = info.get("backing-filename-format")
            if backing_format not in FORMATS:
                raise InvalidInput(
                    field,
                    f"{path} does not record the format of its backing file {name} (QEMU would have to guess it); "
                    f"record it with: qemu-img rebase -u -F <qcow2|raw> -b {name} {path}",
                )
            backing = posixpath.normpath(posixpath.join(directory, name))
        return ImageLayer(
            path=path,
            format=found,
            virtual_size=int(info.get("virtual-size", 0)),
            backing=backing,
            backing_format=backing_format,
            data_file=data_file,
        )

    async def create(self, path: str, fmt: str, size: int, *, tmp: str) -> str:
        """Make a new empty image at ``path`` (see :meth:`_materialize`); return its identity."""
        return await self._materialize(path, tmp, self.qemu_img("create", "-q", "-f", fmt, tmp, str(size)))

    async def create_overlay(self, path: str, base: ImageLayer, size: int, *, tmp: str) -> str:
        """A qcow2 overlay at ``path`` backed by ``base`` (a linked clone: instant, whatever the base's size);
        the backing file's format is recorded in the overlay, so QEMU never probes it."""
        make = self.qemu_img("create", "-q", "-f", "qcow2", "-b", base.path, "-F", base.format, tmp, str(size))
        return await self._materialize(path, tmp, make)

    async def copy(self, path: str, fmt: str, base: ImageLayer, size: int, *, tmp: str, timeout: float) -> str:
        """A full copy of ``base`` at ``path`` in ``fmt`` (``qemu-img convert``), grown to ``size``."""

        async def make() -> None:
            argv = ["qemu-img", "convert", "-q", "-f", base.format, "-O", fmt, base.path, tmp]
            try:
                with qemu_installed():
                    await self.host.run(argv, timeout=timeout)
            except CommandFailed as exc:
                raise QemuError(f"qemu-img convert failed: {exc.stderr.strip()}") from exc
            if size > base.virtual_size:
                await self.resize(tmp, fmt, size)

        return await self._materialize(path, tmp, make())

    async def _materialize(self, path: str, tmp: str, make: Awaitable[object]) -> str:
        """Make a new image as ``tmp`` (a name of the caller's, recorded first so that an interrupted create
        can be undone) and link it to ``path``, which never replaces a file that appeared there meanwhile;
        return its identity (``device:inode:birth:type``).

        :raise InvalidInput: ``path`` exists now.
        :raise QemuError: qemu-img failed.
        """
        try:
            await make
            linked = await self.host.run(["ln", "-T", "--", tmp, path], timeout=self.timeout, check=False)
            if not linked.succeeded:
                if await self.host.stat(path, timeout=self.timeout) is not None:
                    raise InvalidInput("disk", f"{path} appeared while the disk was being made; use another path")
                raise QemuError(f"cannot create {path}: {linked.stderr.strip()}")
            identity = (await self.host.file_ids([path], timeout=self.timeout))[path]
        finally:
            await self.host.run(["rm", "-f", "--", tmp], timeout=self.timeout, check=False)
        if identity is None:
            raise QemuError(f"{path} vanished right after it was made")
        return identity

    async def resize(self, path: str, fmt: str, size: int) -> None:
        await self.qemu_img("resize", "-q", "-f", fmt, path, str(size))

    async def attach_existing(self, path: str, fmt: str | None, size: int | None, *, own_dir: str) -> DiskDefinition:
        """The definition of an existing image used as a VM's disk (kept by delete), after :meth:`inspect`.

        :raise InvalidInput: not a regular file, an unsafe chain, or a ``size`` other than the image's own.
        """
        st = await self.host.stat(path, timeout=self.timeout)
        if st is None or not st.is_file:
            raise InvalidInput("disk", f"{path} exists on {self.host.name} but is not a regular file")
        top = (await self.inspect(path, fmt, own_dir=own_dir))[0]
        if size is not None and size != top.virtual_size:
            raise InvalidInput(
                "disk",
                f"{path} exists with size {format_size(top.virtual_size)}; omit size to attach it as it is, "
                "or grow it later with modify",
            )
        return DiskDefinition(path, top.format, top.virtual_size, created_by_tool=False)

    async def prepare_efi_vars(self, dest: str, firmware: FirmwarePaths = ARM64_FIRMWARE) -> None:
        """A VM's own copy of the UEFI variable store (arm64).

        :raise QemuError: the firmware package is missing on the host.
        """
        template = firmware.vars_template
        if await self.host.stat(template, timeout=self.timeout) is None:
            raise QemuError(f"UEFI firmware {template} is missing on {self.host.name}; install qemu-efi-aarch64 there")
        await self.host.run(["cp", "--", template, dest], timeout=self.timeout)


def temp_name(path: str) -> str:
    """A name beside ``path`` that nobody else uses: what create makes first."""
    directory, base = posixpath.split(path)
    return f"{directory}/.{base}.{secrets.token_hex(6)}.creating"
