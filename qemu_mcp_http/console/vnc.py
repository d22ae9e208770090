"""The VNC stream of a VM whose web console link was granted (see :mod:`.links`), through the host seam."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..errors import SocketUnavailable, VMStateError
from ..fleet.hosts import Fleet
from ..fleet.targets import HostRequest
from ..vm.spec import validate_name, validate_path
from .links import ConsoleGrant

__all__ = ["open_vnc"]


@asynccontextmanager
async def open_vnc(fleet: Fleet, grant: ConsoleGrant, timeout: float) -> AsyncIterator[socket.socket]:
    """The VNC socket of the VM a console link names; the host is held for the session (a pooled SSH connection
    is not closed for idleness under an open console).

    :raise VMStateError: the VM has no screen to show (it is not running).
    """
    request = HostRequest() if grant.host == "localhost" else HostRequest(host=grant.host)
    path = f"{validate_path(grant.vm_dir, 'vm_dir')}/{validate_name(grant.vm)}/vnc.sock"
    async with fleet.host(request) as host:
        try:
            sock = await host.open_unix_socket(path, timeout=timeout)
        except SocketUnavailable as exc:
            raise VMStateError(f"VM {grant.vm} has no screen to show: is it running? ({exc.reason})") from exc
        with sock:
            yield sock
