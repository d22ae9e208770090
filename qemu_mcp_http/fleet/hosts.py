"""The hosts a call may name, and the way to each: this machine, the named hosts of the hosts file (and their
groups), or any SSH host given by address and credentials, reached through the pooled SSH connections."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..config import Settings
from ..errors import CredentialUnusable, InvalidInput
from ..hosts.base import Host
from ..hosts.local import LocalHost
from ..hosts.pool import PoolLimits, SSHPool
from ..hosts.ssh import SSHHost
from .keys import check_ssh_key
from .targets import HostRequest, NamedHost, load_host_groups, load_named_hosts

__all__ = ["Fleet"]


class Fleet:
    """The hosts this server reaches, their connections, and what the settings say of each.

    :raise ValueError: the named-hosts file is unreadable or malformed.
    """

    def __init__(self, settings: Settings, local: LocalHost | None = None) -> None:
        self.settings = settings
        self.local = local or LocalHost()
        self.ssh = SSHPool(PoolLimits.from_settings(settings))
        self.named_hosts: dict[str, NamedHost] = load_named_hosts(settings.ssh_hosts_file)
        self.host_groups: dict[str, tuple[str, ...]] = load_host_groups(settings.ssh_hosts_file, self.named_hosts)

    def names(self) -> list[str]:
        """``localhost`` and the named hosts: the hosts a URI may name (resources, console links)."""
        return ["localhost", *sorted(self.named_hosts)]

    async def aclose(self) -> None:
        """Close the pooled SSH connections."""
        await self.ssh.aclose()

    @asynccontextmanager
    async def host(self, request: HostRequest) -> AsyncIterator[Host]:
        """The host a call targets: the local machine, or a pooled SSH connection.

        :raise InvalidInput: the host arguments are malformed, ``ssh_key`` is not a key clients may use, or the
            call changes a named host's user or port without a credential of its own.
        """
        if request.is_local:
            yield self.local
            return
        if request.ssh_key:
            self._check_client_key(request)
        target = request.ssh_target(self.named_hosts, client_keys=self.settings.allow_client_ssh_keys)
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.ssh.use(target))
            except CredentialUnusable as exc:
                raise InvalidInput("ssh_key", exc.message) from exc
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

    def expand(self, target: str) -> list[str]:
        """The hosts ``*`` (every named host, and the local machine unless --all-hosts-exclude-local) or
        ``@group`` (the hosts file's group) stand for.

        :raise InvalidInput: an unknown group (the message lists the groups).
        """
        if target == "*":
            local = [] if self.settings.all_hosts_exclude_local else ["localhost"]
            return local + sorted(self.named_hosts)
        group = target[1:]
        if group not in self.host_groups:
            known = ", ".join("@" + g for g in sorted(self.host_groups)) or "none (add groups to the hosts file)"
            raise InvalidInput("host", f"no group {group!r}; the groups are: {known}")
        return list(self.host_groups[group])

    def default_vm_dir(self, request: HostRequest) -> str:
        """A call's vm_dir when it gives none: its named host's ``vm_dir``, else the server's."""
        if not request.is_local:
            entry = self.named_hosts.get((request.host or "").strip())
            if entry is not None and entry.vm_dir:
                return entry.vm_dir
        return self.settings.vm_dir

    def link_host(self, request: HostRequest) -> str:
        """The host part of a link to a VM (the web console): ``localhost`` or a named host.

        :raise InvalidInput: a host given by address and credentials (no credential ever goes into a URL).
        """
        host = "localhost" if request.is_local else (request.host or "").strip()
        if not request.is_local and (host not in self.named_hosts or request.ssh_pwd or request.ssh_key):
            raise InvalidInput(
                "host",
                "the web console opens VMs of the local host and of named hosts only (a link carries no "
                "credentials); add the host to the server's hosts file",
            )
        return host

    def resource_host(self, request: HostRequest, vm_dir: str | None) -> str | None:
        """The ``host`` of the ``vm://`` resources of a call's VM: ``localhost`` or a named host, and only for the
        default vm_dir; ``None`` when the VM is no resource (a host given by address, another vm_dir)."""
        if vm_dir is not None and vm_dir.rstrip("/") != self.default_vm_dir(request).rstrip("/"):
            return None
        if request.is_local:
            return "localhost"
        name = (request.host or "").strip()
        if name in self.named_hosts and not (request.ssh_pwd or request.ssh_key or request.ssh_user):
            return name
        return None
