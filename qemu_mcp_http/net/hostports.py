"""Host ports for a VM's forwards: which are in use on its host, and which a start binds.

The ports in use are read from ``/proc/net/{tcp,tcp6,udp,udp6}`` (files, so one batched read over SFTP and
no command on the host); the parser is pure and tested from recorded outputs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

from ..errors import VMStateError
from ..hosts.base import Host
from ..vm.spec import VMDefinition
from .ports import PortForward

__all__ = ["AUTO_PORTS", "assign_ports", "forward_failure", "parse_proc_net", "used_ports"]

#: Where ports of forwards given without a host port are chosen (below Linux's ephemeral range).
AUTO_PORTS = range(20000, 32000)
_PROC_NET = {"tcp": ("/proc/net/tcp", "/proc/net/tcp6"), "udp": ("/proc/net/udp", "/proc/net/udp6")}
#: /proc/net/tcp of a busy host is long (about 150 bytes per socket).
_PROC_NET_MAX = 32 << 20
_HOSTFWD_RE = re.compile(r"Could not set up host forwarding rule '(tcp|udp):[^:]*:(\d+)-")


def parse_proc_net(text: str) -> set[int]:
    """The local ports of the sockets in one ``/proc/net/{tcp,udp}[6]`` table (any state: a port with a live
    socket on it cannot be bound again)."""
    ports: set[int] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 2 or ":" not in fields[1]:
            continue
        try:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except ValueError:
            continue
    return ports


async def used_ports(host: Host, timeout: float) -> dict[str, set[int]]:
    """``{"tcp": ports, "udp": ports}`` in use on ``host`` now."""
    paths = [p for pair in _PROC_NET.values() for p in pair]
    raws = await host.read_files(paths, timeout=timeout, max_bytes=_PROC_NET_MAX)
    return {
        proto: set().union(*(parse_proc_net((raws.get(p) or b"").decode(errors="replace")) for p in pair))
        for proto, pair in _PROC_NET.items()
    }


def assign_ports(
    definition: VMDefinition, used: Mapping[str, set[int]], host: str, rng: random.Random | None = None
) -> dict[str, int]:
    """The host ports of the forwards given without one: the last start's while still free, else a free one.

    :raise VMStateError: a forward's fixed host port is in use on ``host``.
    """
    chooser = rng or random.SystemRandom()
    taken = {proto: set(ports) for proto, ports in used.items()}
    for forward in definition.forwards:
        if forward.host_port is not None:
            if forward.host_port in taken.get(forward.proto, set()):
                raise VMStateError(
                    f"host port {forward.host_port}/{forward.proto} is in use on {host}: forward {forward.spec()} "
                    "cannot be set up; stop what uses it, or modify the VM's ports"
                )
            taken.setdefault(forward.proto, set()).add(forward.host_port)
    assigned: dict[str, int] = {}
    for forward in definition.forwards:
        if forward.host_port is not None:
            continue
        key = _key(forward)
        previous = definition.port_assignments.get(key)
        busy = taken.setdefault(forward.proto, set())
        port = previous if previous is not None and previous not in busy else _free(busy, chooser)
        busy.add(port)
        assigned[key] = port
    return assigned


def forward_failure(stderr: str, host: str) -> str | None:
    """The message for QEMU's failure to bind a forward's host port, or ``None`` for another failure."""
    match = _HOSTFWD_RE.search(stderr)
    if match is None:
        return None
    proto, port = match.groups()
    return (
        f"host port {port}/{proto} could not be bound on {host} (in use, or not allowed there); "
        "stop what uses it or modify the VM's ports"
    )


def _key(forward: PortForward) -> str:
    return f"{forward.proto}:{forward.guest_port}"


def _free(busy: set[int], chooser: random.Random) -> int:
    for _ in range(200):
        port = chooser.randrange(AUTO_PORTS.start, AUTO_PORTS.stop)
        if port not in busy:
            return port
    free = [p for p in AUTO_PORTS if p not in busy]
    if not free:
        raise VMStateError(f"no free host port left in {AUTO_PORTS.start}-{AUTO_PORTS.stop - 1} for a forward")
    return chooser.choice(free)
