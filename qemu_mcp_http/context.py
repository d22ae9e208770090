"""What every tool call gets from the server's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .errors import InvalidInput
from .hosts.base import Host
from .hosts.local import LocalHost
from .version import __version__
from .vm.lifecycle import SharedState

__all__ = ["AppContext", "HostRequest", "LOCAL_NAMES"]

LOCAL_NAMES = ("", "localhost")


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


@dataclass
class AppContext:
    settings: Settings
    shared: SharedState = field(default_factory=SharedState)
    local: LocalHost = field(default_factory=LocalHost)

    async def __aenter__(self) -> AppContext:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close what the server holds (SSH pool, ...); running VMs are left running."""

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "vm_dir": self.settings.vm_dir,
            "accel_setting": self.settings.accel,
            "accel": self.shared.accel_probe.known(),
        }

    @asynccontextmanager
    async def host(self, request: HostRequest) -> AsyncIterator[Host]:
        """The host a call targets: the local machine, or a pooled SSH connection."""
        if request.is_local:
            yield self.local
            return
        if not request.host:
            raise InvalidInput("host", "give the remote host name or IP address")
        raise InvalidInput("host", "remote hosts are not available in this build; omit host to work locally")
