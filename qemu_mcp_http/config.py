"""Settings: one frozen value object, validated once.

Every field can be set by environment (``QEMU_MCP_<FIELD>``, e.g.
``QEMU_MCP_VM_DIR``) and by command-line flag (``--vm-dir``); flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

__all__ = ["DEFAULT_SETTINGS", "Accel", "HostKeyPolicy", "Settings", "parse_settings"]

Accel = Literal["auto", "kvm", "tcg"]
HostKeyPolicy = Literal["strict", "accept-new", "off"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

ENV_PREFIX = "QEMU_MCP_"


@dataclass(frozen=True)
class Settings:
    """Server settings.  Durations are seconds."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "TCP port to bind"})
    vm_dir: str = field(default="/var/lib/qemu", metadata={"help": "default vm_dir of the tools"})
    accel: Accel = field(
        default="auto",
        metadata={"help": "auto (KVM only when a probe proves it runs guests), kvm, tcg"},
    )
    log_level: LogLevel = field(default="INFO", metadata={"help": "log level"})
    # Timeouts: every await that touches a process, socket or host has one.
    qmp_timeout: float = field(default=5.0, metadata={"help": "timeout of one QMP command"})
    command_timeout: float = field(default=60.0, metadata={"help": "timeout of one host command (qemu-img, ...)"})
    start_timeout: float = field(default=30.0, metadata={"help": "time QEMU may take to start and answer QMP"})
    stop_timeout: float = field(default=30.0, metadata={"help": "default wait for a graceful ACPI shutdown"})
    kvm_probe_timeout: float = field(default=5.0, metadata={"help": "time the KVM probe may take"})
    # Limits per VM, so that one call cannot exhaust the host.
    max_memory_mib: int = field(default=262144, metadata={"help": "largest memory of a VM, MiB"})
    max_vcpus: int = field(default=64, metadata={"help": "most vCPUs of a VM"})
    max_disk_gib: int = field(
        default=16384,
        metadata={"help": "largest disk a tool may create or grow to, GiB"},
    )
    # Monitoring.
    monitor_max_duration: float = field(default=86400.0, metadata={"help": "longest monitor_vm_status call"})
    # SSH.
    ssh_connect_timeout: float = field(default=10.0, metadata={"help": "SSH connect + auth timeout"})
    ssh_known_hosts: str = field(default="~/.ssh/known_hosts", metadata={"help": "known_hosts file"})
    ssh_host_key_policy: HostKeyPolicy = field(
        default="strict",
        metadata={"help": "strict, accept-new (trust on first use, then record), off (lab only)"},
    )
    ssh_idle_timeout: float = field(default=300.0, metadata={"help": "close a pooled SSH connection idle this long"})
    ssh_keepalive_interval: float = field(default=15.0, metadata={"help": "SSH keepalive interval"})
    ssh_max_connections_per_host: int = field(default=4, metadata={"help": "pooled SSH connections per host"})
    ssh_max_channels_per_connection: int = field(
        default=8,
        metadata={"help": "concurrent channels per SSH connection (sshd MaxSessions is 10)"},
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            choices = _choices(f.type)
            if choices and value not in choices:
                problems.append(f"{f.name} must be one of {', '.join(choices)} (got {value!r})")
            elif isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                problems.append(f"{f.name} must be > 0 (got {value!r})")
        if not 0 < self.port < 65536:
            problems.append(f"port must be 1..65535 (got {self.port})")
        if not os.path.isabs(self.vm_dir):
            problems.append(f"vm_dir must be an absolute path (got {self.vm_dir!r})")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _choices(annotation: Any) -> tuple[str, ...]:
    resolved = {
        "Accel": Accel,
        "HostKeyPolicy": HostKeyPolicy,
        "LogLevel": LogLevel,
    }.get(str(annotation))
    return tuple(get_args(resolved)) if resolved is not None else ()


def _caster(annotation: Any) -> type:
    return {"int": int, "float": float}.get(str(annotation), str)


DEFAULT_SETTINGS = Settings()


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from defaults, then ``QEMU_MCP_*`` variables, then flags.

    :raise ValueError: a value is malformed (the message names it).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            try:
                values[f.name] = _caster(f.type)(raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from exc
    parser = argparse.ArgumentParser(prog="qemu-mcp-http", description="MCP server managing QEMU VMs over HTTP")
    for f in fields(Settings):
        choices = _choices(f.type) or None
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_caster(f.type),
            choices=choices,
            default=None,
            help=f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{f.name.upper()}; default {f.default!r})",
        )
    args = parser.parse_args(argv)
    values.update({k: v for k, v in vars(args).items() if v is not None})
    return Settings(**values)
