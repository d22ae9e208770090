"""What every tool call gets from the server's lifespan."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import Settings
from .errors import InvalidInput
from .hosts.base import Host
from .hosts.local import LocalHost
from .hosts.pool import PoolLimits, SSHPool, SSHTarget
from .hosts.ssh import SSHHost
from .observability import Metrics
from .security import check_ssh_key
from .version import __version__
from .vm.fence import Fence, FenceRules
from .vm.lifecycle import SharedState, VMManager
from .vm.spec import validate_path

__all__ = ["AppContext", "HostRequest", "LOCAL_NAMES", "NamedHost", "load_named_hosts"]

LOCAL_NAMES = ("", "localhost")
#: How long a shutdown waits for state-changing operations under way (a stop may wait for a guest).
OPERATIONS_GRACE_S = 60.0

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class NamedHost:
    """A remote host of the server's settings: clients name it instead of sending credentials."""

    address: str
    user: str
    port: int = 22
    key: str | None = None
    known_hosts: str | None = None
    #: Remote directories vm_dir, disk and iso must lie under (resolved on the host); empty: the account's rights.
    allowed_roots: tuple[str, ...] = ()


def load_named_hosts(path: str) -> dict[str, NamedHost]:
    """Read ``{name: {address, port, user, key, known_hosts}}``.

    :raise ValueError: unreadable file or malformed entry (the message names it).
    """
    if not path:
        return {}
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"ssh_hosts_file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"ssh_hosts_file {path}: expected an object of named hosts")
    hosts: dict[str, NamedHost] = {}
    allowed = {"address", "port", "user", "key", "known_hosts", "allowed_roots"}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or not {"address", "user"} <= entry.keys() or not entry.keys() <= allowed:
            raise ValueError(
                f"ssh_hosts_file {path}: host {name!r} needs address and user, "
                "and may have port, key, known_hosts, allowed_roots"
            )
        try:
            hosts[str(name)] = NamedHost(
                address=str(entry["address"]),
                user=str(entry["user"]),
                port=int(entry.get("port", 22)),
                key=str(entry["key"]) if entry.get("key") else None,
                known_hosts=str(entry["known_hosts"]) if entry.get("known_hosts") else None,
                allowed_roots=_roots(entry.get("allowed_roots", [])),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ssh_hosts_file {path}: host {name!r}: {exc}") from exc
    return hosts


def _roots(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(r, str) and r.startswith("/") for r in raw):
        raise ValueError("allowed_roots must be a list of absolute paths")
    return tuple(raw)


@dataclass(frozen=True)
class HostRequest:
    """The host arguments of a tool call; ``repr`` never shows the password."""

    host: str | None = None
    ssh_port: int = 22
    ssh_user: str | None = None
    ssh_pwd: str | None = field(default=None, repr=False)
    ssh_key: str | None = None

    @property
    def is_local(self) -> bool:
        return (self.host or "") in LOCAL_NAMES and not self.ssh_user

    @property
    def display_name(self) -> str:
        return "localhost" if self.is_local else str(self.host)

    def ssh_target(self, named: Mapping[str, NamedHost] | None = None) -> SSHTarget:
        """The SSH connection this request asks for; a named host fills in what the call leaves out.

        A credential in the call (ssh_key or ssh_pwd) replaces the named host's key; ``ssh_port`` other
        than the default 22 replaces its port.

        :raise InvalidInput: host, ssh_user or the credential is missing or malformed.
        """
        host = (self.host or "").strip()
        entry = (named or {}).get(host)
        if entry is not None:
            own_credential = bool(self.ssh_key or self.ssh_pwd)
            return HostRequest(
                host=entry.address,
                ssh_port=self.ssh_port if self.ssh_port != 22 else entry.port,
                ssh_user=self.ssh_user or entry.user,
                ssh_pwd=self.ssh_pwd,
                ssh_key=self.ssh_key if own_credential else entry.key,
            )._target(name=host, known_hosts=entry.known_hosts)
        return self._target()

    def _target(self, name: str = "", known_hosts: str | None = None) -> SSHTarget:
        host = (self.host or "").strip()
        if not host:
            raise InvalidInput("host", "give the remote host name or IP address")
        if host.startswith("-") or any(c.isspace() or not c.isprintable() or c in "/@" for c in host):
            raise InvalidInput("host", f"{host!r} is not a host name or IP address")
        if not self.ssh_user:
            raise InvalidInput("ssh_user", f"required for the remote host {host}; give the SSH user name")
        if self.ssh_user.startswith("-") or any(c.isspace() or not c.isprintable() for c in self.ssh_user):
            raise InvalidInput("ssh_user", "must be a user name without spaces or control characters")
        if not self.ssh_key and not self.ssh_pwd:
            raise InvalidInput("ssh_pwd", f"give ssh_pwd or ssh_key to log in to {host} as {self.ssh_user}")
        if not 0 < self.ssh_port < 65536:
            raise InvalidInput("ssh_port", "must be 1..65535")
        return SSHTarget(
            host=host,
            port=self.ssh_port,
            user=self.ssh_user,
            password=None if self.ssh_key else self.ssh_pwd,  # the key wins
            key_path=self.ssh_key or None,
            name=name,
            known_hosts=known_hosts,
        )


@dataclass
class AppContext:
    settings: Settings
    shared: SharedState = field(default_factory=SharedState)
    local: LocalHost = field(default_factory=LocalHost)
    ssh: SSHPool = field(init=False)
    named_hosts: dict[str, NamedHost] = field(init=False)
    metrics: Metrics = field(init=False)
    #: State-changing calls run to their end in these tasks, even when their client goes away.
    operations: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        """:raise ValueError: the named-hosts file is unreadable or malformed."""
        self.ssh = SSHPool(PoolLimits.from_settings(self.settings))
        streams = self.shared.monitor_streams
        self.metrics = Metrics(pool=self.ssh.snapshot, monitor_streams=lambda: streams.running)
        self.named_hosts = load_named_hosts(self.settings.ssh_hosts_file)

    async def __aenter__(self) -> AppContext:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let operations under way finish (bounded), then close what the server holds (SSH pool, ...);
        running VMs are left running."""
        if self.operations:
            pending = list(self.operations)
            log.info("waiting up to %g s for %d operation(s) under way", OPERATIONS_GRACE_S, len(pending))
            _, late = await asyncio.wait(pending, timeout=OPERATIONS_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.ssh.aclose()

    def detach(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` in a task of the server's: cancelling the caller does not cancel it."""
        task = asyncio.get_running_loop().create_task(work)
        self.operations.add(task)
        task.add_done_callback(self.operations.discard)
        return task

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "vm_dir": self.settings.vm_dir,
            "accel_setting": self.settings.accel,
            "accel": self.shared.accel_probe.known(),
            "ssh": {**self.ssh.snapshot(), "named_hosts": sorted(self.named_hosts)},
        }

    @asynccontextmanager
    async def host(self, request: HostRequest) -> AsyncIterator[Host]:
        """The host a call targets: the local machine, or a pooled SSH connection.

        :raise InvalidInput: the host arguments are malformed, or ``ssh_key`` is not a key clients may use.
        """
        if request.is_local:
            yield self.local
            return
        if request.ssh_key:
            self._check_client_key(request)
        target = request.ssh_target(self.named_hosts)
        async with self.ssh.use(target):
            yield SSHHost(self.ssh, target)

    def _check_client_key(self, request: HostRequest) -> None:
        """A key is a file of this server: it must lie under ``--ssh-key-dirs``, and it is the operator's
        credential, so by default it opens only the named hosts (which carry their own ``allowed_roots``)."""
        key = request.ssh_key or ""
        check_ssh_key(self.settings, key)
        if (request.host or "").strip() not in self.named_hosts and not self.settings.allow_client_ssh_keys:
            raise InvalidInput(
                "ssh_key",
                f"the server's SSH keys may only be used for the named hosts of its hosts file "
                f"({', '.join(sorted(self.named_hosts)) or 'none configured'}); log in to {request.host} with "
                "ssh_pwd, use a named host, or ask the operator to set --allow-client-ssh-keys",
            )

    def fence_rules(self, request: HostRequest) -> FenceRules:
        """The roots paths of a call may use on its host (see :mod:`.vm.fence`)."""
        if request.is_local:
            s = self.settings
            roots = tuple(os.path.expanduser(r) for r in (s.allowed_roots or (s.vm_dir,)))
            return FenceRules(roots=roots, iso_roots=tuple(os.path.expanduser(r) for r in s.iso_dirs))
        name = (request.host or "").strip()
        entry = self.named_hosts.get(name)
        if entry is not None and entry.allowed_roots:
            return FenceRules(roots=entry.allowed_roots, source=name)
        return FenceRules(roots=None, source=request.display_name)

    @asynccontextmanager
    async def vms(self, request: HostRequest, vm_dir: str | None) -> AsyncIterator[VMManager]:
        """The VMs of ``vm_dir`` (default: the server's) on the call's host, the vm_dir checked against the
        host's roots (resolved there); every further path is checked by the manager as it uses it.

        :raise InvalidInput: bad host arguments, or a vm_dir outside the roots.
        :raise HostError: the host cannot be reached.
        """
        directory = validate_path(vm_dir or self.settings.vm_dir, "vm_dir")
        async with self.host(request) as host:
            fence = Fence(host, self.fence_rules(request), self.settings.command_timeout)
            if fence.rules.roots is not None:
                real = (await fence.resolve([directory]))[0]
                fence.check_roots("vm_dir", directory, real, "vm_dir")
            yield VMManager(host, directory, self.settings, self.shared, fence)
