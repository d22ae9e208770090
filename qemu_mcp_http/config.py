"""Settings: one frozen value object, validated once.

Every field can be set by environment (``QEMU_MCP_<FIELD>``, e.g.
``QEMU_MCP_VM_DIR``) and by command-line flag (``--vm-dir``); flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from .version import __version__

__all__ = [
    "DEFAULT_SETTINGS",
    "Accel",
    "HostKeyPolicy",
    "Invocation",
    "ConfirmPolicy",
    "LogFormat",
    "Settings",
    "parse_invocation",
    "parse_settings",
]

Accel = Literal["auto", "kvm", "tcg"]
HostKeyPolicy = Literal["strict", "accept-new", "off"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]
ConfirmPolicy = Literal["elicit", "require", "never"]

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
    log_format: LogFormat = field(
        default="text",
        metadata={
            "help": "text (for people) or json (one object per line: time, level, logger, message, and for tool "
            "calls request_id, tool, host, vm, action, duration_ms, outcome, error)"
        },
    )
    # Timeouts: every await that touches a process, socket or host has one.
    qmp_timeout: float = field(default=5.0, metadata={"help": "timeout of one QMP command"})
    qmp_idle_hold: float = field(
        default=2.0,
        metadata={
            "help": "keep a VM's QMP connection open this long after its last use; a QMP socket serves one client "
            "at a time, so replicas sharing a vm_dir want it short (e.g. 0.05)"
        },
    )
    command_timeout: float = field(default=60.0, metadata={"help": "timeout of one host command (qemu-img, ...)"})
    start_timeout: float = field(default=30.0, metadata={"help": "time QEMU may take to start and answer QMP"})
    stop_timeout: float = field(default=30.0, metadata={"help": "default wait for a graceful ACPI shutdown"})
    max_stop_timeout: float = field(default=600.0, metadata={"help": "largest stop_timeout a call may ask"})
    kvm_probe_timeout: float = field(default=5.0, metadata={"help": "time the KVM probe may take"})
    image_copy_timeout: float = field(
        default=3600.0, metadata={"help": "time a full clone (qemu-img convert of an image) may take"}
    )
    max_wait_timeout: float = field(default=3600.0, metadata={"help": "largest wait_timeout of start"})
    snapshot_timeout: float = field(
        default=900.0, metadata={"help": "time a snapshot job of a running VM (save, load, delete) may take"}
    )
    lock_timeout: float = field(
        default=90.0,
        metadata={"help": "longest wait for another operation on the same VM (this server's or another process's)"},
    )
    # Limits per VM, so that one call cannot exhaust the host.
    max_memory_mib: int = field(default=262144, metadata={"help": "largest memory of a VM, MiB"})
    max_vcpus: int = field(default=64, metadata={"help": "most vCPUs of a VM"})
    max_disk_gib: int = field(
        default=16384,
        metadata={"help": "largest disk a tool may create or grow to, GiB"},
    )
    # Guest agent (vm_guest).
    guest_output_limit: int = field(
        default=1 << 20, metadata={"help": "bytes of stdout and of stderr vm_guest exec returns (the rest is cut)"}
    )
    guest_file_limit: int = field(
        default=8 << 20, metadata={"help": "largest file vm_guest read_file / write_file moves, bytes"}
    )
    # CPU work whose size a client or a guest decides (pattern searches over the console), off the event loop.
    cpu_workers: int = field(
        default=2,
        metadata={
            "help": "worker threads for CPU work on client or guest input (vm_console wait patterns); one client "
            "holds at most all but one of them"
        },
    )
    pattern_cpu_per_call: float = field(
        default=10.0,
        metadata={
            "help": "CPU seconds one vm_console wait may spend searching, counted as the search's running time "
            "(its timeout bounds it too)"
        },
    )
    pattern_cpu_per_client: float = field(
        default=30.0,
        metadata={"help": "CPU seconds of pattern searching per client (token or address), refilled over a minute"},
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
    ssh_hosts_file: str = field(
        default="",
        metadata={
            "help": "JSON file of named SSH hosts, {name: {address, port, user, key, known_hosts, allowed_roots, "
            "vm_dir}}; clients then pass host=<name> without credentials (tool arguments override)"
        },
    )

    # Security.
    token: str = field(
        default="",
        repr=False,
        metadata={"help": "bearer token required on /mcp (prefer --token-file; required off loopback)"},
    )
    token_file: str = field(
        default="",
        metadata={
            "help": "file of bearer tokens, one per line: 'token', or 'client-id token [read|operate|admin] "
            "[hosts=a,b] [confirm=elicit|require|never]' (no scope: admin)"
        },
    )
    confirm: ConfirmPolicy = field(
        default="elicit",
        metadata={
            "help": "confirmation of destructive calls (delete, a modify that restarts, snapshot revert/delete, "
            "guest write_file): elicit (ask the user of clients that can; others proceed), require (clients that "
            "cannot ask are refused), never; a token's confirm= overrides it"
        },
    )
    watch_interval: float = field(
        default=1.0,
        metadata={
            "help": "while a client is subscribed to VM resources, rescan the local vm_dir this often for changes "
            "made outside the server (a local VM's exit is seen at once anyway)"
        },
    )
    watch_remote_interval: float = field(
        default=5.0, metadata={"help": "the same for named hosts (one scan over the pooled SSH connection)"}
    )
    allow_unauthenticated: bool = field(
        default=False,
        metadata={"help": "DANGEROUS: serve a non-loopback address without a token"},
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Host headers accepted, comma-separated patterns (default: loopback, plus the bind address)"},
    )
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Origin headers accepted, comma-separated patterns (default: loopback origins)"},
    )
    allowed_roots: tuple[str, ...] = field(
        default=(),
        metadata={"help": "local directories vm_dir, disk and iso paths must lie under (default: vm_dir)"},
    )
    iso_dirs: tuple[str, ...] = field(default=(), metadata={"help": "further local directories ISOs may come from"})
    image_dirs: tuple[str, ...] = field(
        default=(), metadata={"help": "further local directories disk images (create's image) may come from"}
    )
    forward_address: str = field(
        default="127.0.0.1",
        metadata={
            "help": "IPv4 address port forwards (ports) bind on the VM's host; 0.0.0.0 exposes them to the network"
        },
    )
    ssh_key_dirs: tuple[str, ...] = field(
        default=("~/.ssh",),
        metadata={"help": "directories an ssh_key path must lie under"},
    )
    allow_client_ssh_keys: bool = field(
        default=False,
        metadata={
            "help": "DANGEROUS: let clients use the server's SSH keys (under --ssh-key-dirs) for any host, not only "
            "for named hosts; a key that opens this machine then bypasses --allowed-roots"
        },
    )
    max_request_bytes: int = field(default=1 << 20, metadata={"help": "largest HTTP request body"})
    max_monitor_streams_per_client: int = field(
        default=4,
        metadata={"help": "concurrent monitor_vm_status calls per client (token or address)"},
    )
    max_monitor_streams: int = field(default=64, metadata={"help": "concurrent monitor_vm_status calls in all"})
    novnc_dir: str = field(
        default="/usr/share/novnc", metadata={"help": "noVNC's files, served by the web console (Debian: novnc)"}
    )
    # Replicas and fleets.
    stateless: bool = field(
        default=False,
        metadata={
            "help": "serve handshake-revision (2025) clients statelessly, so that any replica answers any request "
            "behind a round-robin balancer; they then get no elicitation and no resources/subscribe notifications "
            "(2026-07-28 clients are stateless anyway); without it, balance them with sticky sessions"
        },
    )
    redis_url: str = field(
        default="",
        repr=False,
        metadata={
            "help": "redis://host:port/db: replicas share resource-change events through Redis pub/sub "
            "(empty: events stay in this process)"
        },
    )
    shared_secret_file: str = field(
        default="",
        metadata={
            "help": "file holding a secret (>= 32 bytes) the replicas share: it seals the request_state of "
            "multi-round calls (elicitation) and signs web console links, so that any replica accepts them "
            "(empty: a random secret per process)"
        },
    )
    all_hosts_exclude_local: bool = field(
        default=False,
        metadata={"help": "list_vms host='*' asks only the named hosts, not the local machine"},
    )
    audit_log: str = field(
        default="",
        metadata={"help": "also append audit lines (JSON) to this file; they always go to the log"},
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            choices = _choices(f.type)
            if choices and value not in choices:
                problems.append(f"{f.name} must be one of {', '.join(choices)} (got {value!r})")
            elif isinstance(value, int | float) and not isinstance(value, bool) and not 0 < value < math.inf:
                problems.append(f"{f.name} must be a finite number > 0 (got {value!r})")
        if not 0 < self.port < 65536:
            problems.append(f"port must be 1..65535 (got {self.port})")
        try:
            ipaddress.IPv4Address(self.forward_address)
        except ValueError:
            problems.append(f"forward_address must be an IPv4 address (got {self.forward_address!r})")
        if not os.path.isabs(self.vm_dir):
            problems.append(f"vm_dir must be an absolute path (got {self.vm_dir!r})")
        if not is_loopback(self.host) and not (self.token or self.token_file) and not self.allow_unauthenticated:
            problems.append(
                f"host {self.host} is not a loopback address: set a bearer token (QEMU_MCP_TOKEN_FILE or "
                "QEMU_MCP_TOKEN), or pass --allow-unauthenticated to expose VM control to anyone who can connect"
            )
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _choices(annotation: Any) -> tuple[str, ...]:
    resolved = {
        "Accel": Accel,
        "HostKeyPolicy": HostKeyPolicy,
        "LogLevel": LogLevel,
        "LogFormat": LogFormat,
    }.get(str(annotation))
    return tuple(get_args(resolved)) if resolved is not None else ()


def _as_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean; use 1 or 0")


def _as_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _caster(annotation: Any) -> Callable[[str], Any]:
    casters: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": float,
        "bool": _as_bool,
        "tuple[str, ...]": _as_list,
    }
    return casters.get(str(annotation), str)


DEFAULT_SETTINGS = Settings()


@dataclass(frozen=True)
class Invocation:
    """What the command line asks for: serve (default) or ``check``, with the settings' flags and environment.

    The settings are built on demand, so that ``--check`` can report a bad setting instead of dying of it.
    """

    flags: Mapping[str, Any]
    environ: Mapping[str, str]
    check: bool = False

    def settings(self) -> Settings:
        """Defaults, then ``QEMU_MCP_*`` variables, then flags.

        :raise ValueError: a value is malformed (the message names it).
        """
        values: dict[str, Any] = {}
        for f in fields(Settings):
            raw = self.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                try:
                    values[f.name] = _caster(f.type)(raw)
                except ValueError as exc:
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from exc
        values.update(self.flags)
        return Settings(**values)


def parse_invocation(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Invocation:
    """Parse the flags (``--help`` and ``--version`` print and exit, a malformed flag exits 2, as argparse does)."""
    parser = argparse.ArgumentParser(prog="qemu-mcp-http", description="MCP server managing QEMU VMs over HTTP")
    parser.add_argument("--version", action="version", version=f"qemu-mcp-http {__version__}")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the settings and this machine (QEMU binaries, UEFI firmware, vm_dir, KVM), print a report "
        "and exit: 0 when the server can run here, 1 when something it needs is missing",
    )
    for f in fields(Settings):
        choices = _choices(f.type) or None
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{f.name.upper()}; default {f.default!r})"
        if str(f.type) == "bool":
            parser.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help_text)
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            type=_caster(f.type),
            choices=choices,
            default=None,
            help=help_text,
        )
    args = vars(parser.parse_args(argv))
    check = bool(args.pop("check"))
    return Invocation(
        flags={k: v for k, v in args.items() if v is not None},
        environ={k: v for k, v in (os.environ if environ is None else environ).items() if k.startswith(ENV_PREFIX)},
        check=check,
    )


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from defaults, then ``QEMU_MCP_*`` variables, then flags.

    :raise ValueError: a value is malformed (the message names it).
    """
    return parse_invocation(argv, environ).settings()
