"""Parsing and validation of tool arguments, and the VM definition stored on disk.

Pure functions: no I/O here, so every rule is unit-testable.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Any, Literal

from ..errors import InvalidInput, LimitExceeded
from ..guest.cloudinit import CloudInitConfig
from ..net.ports import NetworkSpec, PortForward, check_ports_network, parse_network, parse_ports

__all__ = [
    "ARCHES",
    "DiskSpec",
    "VMDefinition",
    "format_size",
    "parse_arch",
    "parse_disk",
    "parse_memory_mib",
    "parse_size_bytes",
    "validate_name",
    "validate_path",
    "validate_vcpus",
]

Arch = Literal["x86_64", "arm64"]
ARCHES: tuple[Arch, ...] = ("x86_64", "arm64")
_ARCH_ALIASES: dict[str, Arch] = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "arm64": "arm64",
    "aarch64": "arm64",
}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
#: Every size a server allows has fewer digits; a longer number is refused before any arithmetic.
_MAX_SIZE_DIGITS = 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
GIB = 1 << 30
MIB = 1 << 20
#: 2: created disks carry their file identity. 3: ports, network, cloud_init, image.
DEFINITION_VERSION = 3


def validate_name(name: str | None) -> str:
    if not name:
        raise InvalidInput("name", "a VM name is required, e.g. name='web-1'")
    if not NAME_RE.fullmatch(name):
        raise InvalidInput(
            "name",
            f"{name!r} is not allowed; use 1-63 characters from A-Z a-z 0-9 . _ - starting with a letter or digit",
        )
    return name


def parse_arch(arch: str | None) -> Arch:
    if not arch:
        raise InvalidInput("arch", "required for create; use x86_64 or arm64")
    try:
        return _ARCH_ALIASES[arch.strip().lower()]
    except KeyError:
        raise InvalidInput(  # noqa: B904 - the KeyError says nothing the message does not
            "arch",
            f"{arch!r} is not supported; use x86_64 (alias amd64) or arm64 (alias aarch64)",
        )


def parse_size_bytes(text: str, field_name: str, default_unit: str = "") -> int:
    """``20G``, ``512M``, ``1.5T``, ``4096`` (bytes unless ``default_unit``) → bytes."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise InvalidInput(
            field_name,
            f"{text!r} is not a size; use a number with K, M, G or T, e.g. 20G or 4096M",
        )
    number, unit = match.groups()
    if len(number) > _MAX_SIZE_DIGITS:
        raise InvalidInput(field_name, f"{text[:30]!r}... is far too large; use e.g. 20G or 4096M")
    value = Fraction(number) * _UNITS[(unit or default_unit).upper()]  # exact: no float rounding or overflow
    if value <= 0 or value.denominator != 1:
        raise InvalidInput(field_name, f"{text!r} must be a positive whole number of bytes")
    return int(value)


def parse_memory_mib(text: str | int, max_mib: int) -> int:
    """Memory as ``2G`` / ``4096M`` / ``512M`` (a bare number is MiB, as QEMU's ``-m``) → MiB."""
    raw = str(text)
    size = parse_size_bytes(raw, "memory", default_unit="M")
    if size % MIB:
        raise InvalidInput("memory", f"{raw!r} must be a whole number of MiB, e.g. 512M or 2G")
    mib = size // MIB
    if mib < 16:
        raise InvalidInput("memory", f"{raw!r} is too small; give at least 16M")
    if mib > max_mib:
        raise LimitExceeded(f"memory {raw} exceeds this server's limit of {format_size(max_mib * MIB)}")
    return mib


def validate_vcpus(vcpus: int, max_vcpus: int) -> int:
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
        raise InvalidInput("vcpus", f"{vcpus!r} must be a whole number >= 1")
    if vcpus > max_vcpus:
        raise LimitExceeded(f"vcpus {vcpus} exceeds this server's limit of {max_vcpus}")
    return vcpus


def validate_path(path: str, field_name: str) -> str:
    """An absolute, normalised path that cannot be taken for an option or a QEMU sub-option."""
    if not path or not path.startswith("/"):
        raise InvalidInput(
            field_name,
            f"{path!r} must be an absolute path, e.g. /var/lib/qemu/iso/debian.iso",
        )
    if "," in path or "\n" in path or "\0" in path:
        # A comma would split QEMU's -drive option string into further options.
        raise InvalidInput(field_name, f"{path!r} may not contain commas, newlines or NUL bytes")
    return posixpath.normpath(path)


@dataclass(frozen=True)
class DiskSpec:
    """A parsed ``disk`` argument: ``path=/x.qcow2,size=20G[,format=raw]``; every key optional."""

    path: str | None = None
    size_bytes: int | None = None
    format: Literal["qcow2", "raw"] | None = None


def parse_disk(text: str | None, max_disk_bytes: int) -> DiskSpec:
    if text is None or not text.strip():
        return DiskSpec()
    values: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("path", "size", "format") or not value.strip():
            raise InvalidInput(
                "disk",
                f"{text!r} is malformed; use 'path=/data/vm/disk.qcow2,size=20G' (keys: path, size, format)",
            )
        if key in values:
            raise InvalidInput("disk", f"{key!r} is given twice in {text!r}")
        values[key] = value.strip()
    path = validate_path(values["path"], "disk") if "path" in values else None
    size = parse_size_bytes(values["size"], "disk") if "size" in values else None
    if size is not None and size > max_disk_bytes:
        raise LimitExceeded(f"disk size {values['size']} exceeds this server's limit of {format_size(max_disk_bytes)}")
    fmt = values.get("format")
    if fmt is not None and fmt not in ("qcow2", "raw"):
        raise InvalidInput("disk", f"format {fmt!r} is not supported; use qcow2 or raw")
    return DiskSpec(path=path, size_bytes=size, format=fmt)  # type: ignore[arg-type]


def disk_format_for(path: str, given: str | None) -> Literal["qcow2", "raw"]:
    if given == "raw" or (given is None and path.lower().endswith((".raw", ".img"))):
        return "raw"
    return "qcow2"


def format_size(size_bytes: int) -> str:
    """Bytes → the shortest exact ``20G`` / ``512M`` / ``1536K`` form."""
    for unit in ("T", "G", "M", "K"):
        if size_bytes >= _UNITS[unit] and size_bytes % _UNITS[unit] == 0:
            return f"{size_bytes // _UNITS[unit]}{unit}"
    return str(size_bytes)


@dataclass(frozen=True)
class DiskDefinition:
    path: str
    format: Literal["qcow2", "raw"]
    size_bytes: int
    #: True when create made this file; delete only removes files the tool created.
    created_by_tool: bool
    #: ``device:inode`` of the file create made: delete removes the file at ``path`` only while it is still
    #: that file, so a definition edited to name another file cannot make delete remove it.
    identity: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": format_size(self.size_bytes),
            "format": self.format,
        }


@dataclass(frozen=True)
class VMDefinition:
    """What is stored in ``<vm_dir>/<name>/vm.json``: all a VM needs to start the same way again."""

    name: str
    arch: Arch
    memory_mib: int
    vcpus: int
    disk: DiskDefinition
    iso: str | None
    uuid: str
    mac: str
    created_at: str
    machine: str
    version: int = DEFINITION_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: Port forwards in their canonical form ("2222:22", "22", "53/udp").
    ports: tuple[str, ...] = ()
    #: Host ports chosen at start for forwards without one ("tcp:22" -> 40222), kept while they are free.
    port_assignments: dict[str, int] = field(default_factory=dict)
    #: "user", "none" or "bridge=<name>".
    network: str = "user"
    #: The cloud_init the seed ISO was made from (never a password or its hash) and the seed's instance-id.
    cloud_init: dict[str, Any] | None = None
    #: What the disk was made from: {"path", "format", "clone": "linked" | "full", "vm": name or None}.
    image: dict[str, Any] | None = None

    @property
    def memory(self) -> str:
        return format_size(self.memory_mib * MIB)

    @property
    def forwards(self) -> tuple[PortForward, ...]:
        return parse_ports(list(self.ports)) if self.ports else ()

    @property
    def network_spec(self) -> NetworkSpec:
        return parse_network(self.network)

    def host_port(self, forward: PortForward) -> int | None:
        """The host port of ``forward``: its own, or the one chosen at the last start."""
        return forward.host_port or self.port_assignments.get(f"{forward.proto}:{forward.guest_port}")

    @property
    def ssh_port(self) -> int | None:
        """The host port forwarded to the guest's port 22, if any."""
        return next((self.host_port(f) for f in self.forwards if f.guest_port == 22 and f.proto == "tcp"), None)

    def summary(self) -> dict[str, Any]:
        """The configuration as clients see it (``details``, ``list_vms``)."""
        out: dict[str, Any] = {
            "arch": self.arch,
            "memory": self.memory,
            "vcpus": self.vcpus,
            "disk": self.disk.summary(),
            "iso": self.iso,
        }
        if self.ports:
            out["ports"] = [{**f.summary(), "host_port": self.host_port(f)} for f in self.forwards]
        if self.network != "user":
            out["network"] = self.network
        if self.cloud_init is not None:
            out["cloud_init"] = CloudInitConfig.from_json(self.cloud_init["config"]).summary()
        if self.image is not None:
            out["image"] = {k: self.image.get(k) for k in ("path", "format", "clone", "vm")}
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMDefinition:
        """:raise ValueError: the data is not a definition this version understands."""
        try:
            disk = DiskDefinition(**data["disk"])
            fields_ = {k: v for k, v in data.items() if k != "disk"}
            if isinstance(fields_.get("ports"), list):
                fields_["ports"] = tuple(fields_["ports"])
            definition = cls(disk=disk, **fields_)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a VM definition: {exc}") from exc
        if definition.arch not in ARCHES or not NAME_RE.fullmatch(definition.name):
            raise ValueError("not a VM definition: bad name or arch")
        _check_types(definition)
        return definition

    def evolve(self, **changes: Any) -> VMDefinition:
        return replace(self, **changes)


def _check_types(d: VMDefinition) -> None:
    """:raise ValueError: a field of a definition read from disk has the wrong type (the file is not ours)."""
    expected: list[tuple[object, type | tuple[type, ...]]] = [
        (d.memory_mib, int),
        (d.vcpus, int),
        (d.uuid, str),
        (d.mac, str),
        (d.created_at, str),
        (d.machine, str),
        (d.version, int),
        (d.extra, dict),
        (d.iso, (str, type(None))),
        (d.disk.path, str),
        (d.disk.size_bytes, int),
        (d.disk.created_by_tool, bool),
        (d.disk.identity, (str, type(None))),
    ]
    for value, kind in expected:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"not a VM definition: {value!r} has the wrong type")
    if d.disk.format not in ("qcow2", "raw") or d.memory_mib < 1 or d.vcpus < 1 or d.disk.size_bytes < 0:
        raise ValueError("not a VM definition: bad disk format, memory or vcpus")
    # Values that reach QEMU's option strings: a comma would add options of the writer's choosing.
    for path in (d.disk.path, *([d.iso] if d.iso is not None else [])):
        try:
            validate_path(path, "path")
        except InvalidInput as exc:
            raise ValueError(f"not a VM definition: {exc.message}") from exc
    if not _MAC_RE.fullmatch(d.mac) or not _UUID_RE.fullmatch(d.uuid) or not _MACHINE_RE.fullmatch(d.machine):
        raise ValueError("not a VM definition: bad mac, uuid or machine")
    _check_guest_access(d)


def _check_guest_access(d: VMDefinition) -> None:
    """:raise ValueError: ports, network, cloud_init or image are not what create writes."""
    try:
        if not isinstance(d.ports, tuple) or not all(isinstance(p, str) for p in d.ports):
            raise ValueError("ports")
        forwards = d.forwards
        network = d.network_spec if isinstance(d.network, str) else None
        if network is None:
            raise ValueError("network")
        check_ports_network(forwards, network)
        assignments = d.port_assignments
        if not isinstance(assignments, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536
            for k, v in assignments.items()
        ):
            raise ValueError("port_assignments")
        if d.cloud_init is not None:
            config = d.cloud_init.get("config") if isinstance(d.cloud_init, dict) else None
            instance = d.cloud_init.get("instance_id") if isinstance(d.cloud_init, dict) else None
            if not isinstance(config, dict) or not isinstance(instance, str) or not _INSTANCE_RE.fullmatch(instance):
                raise ValueError("cloud_init")
            CloudInitConfig.from_json(config)
        if d.image is not None:
            path = d.image.get("path") if isinstance(d.image, dict) else None
            if not isinstance(path, str) or d.image.get("format") not in ("qcow2", "raw"):
                raise ValueError("image")
            validate_path(path, "image")
    except InvalidInput as exc:
        raise ValueError(f"not a VM definition: {exc.message}") from exc
    except ValueError as exc:
        raise ValueError(f"not a VM definition: bad {exc}") from exc


_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MACHINE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,40}")
_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
