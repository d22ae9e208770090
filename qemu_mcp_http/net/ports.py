"""Guest networking arguments: ``ports`` (QEMU user-networking ``hostfwd``) and ``network``.

Pure functions: no I/O here.  Free host ports for ``"GUEST"`` forwards are
chosen by the product when the VM starts, not here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import InvalidInput

__all__ = [
    "MAX_FORWARDS",
    "NetworkSpec",
    "PortForward",
    "check_ports_network",
    "parse_network",
    "parse_ports",
]

Proto = Literal["tcp", "udp"]
NetworkMode = Literal["user", "none", "bridge"]
MAX_FORWARDS = 32
_FORWARD_RE = re.compile(r"(?:([0-9]{1,5}):)?([0-9]{1,5})(?:/(tcp|udp))?")
_BRIDGE_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,14}")
_FORMS = (
    "use 'HOST:GUEST' (e.g. '2222:22'), 'GUEST' (a free host port is chosen at start, e.g. '22'), "
    "each with an optional '/udp' or '/tcp' suffix (e.g. '5353:53/udp'); ports are 1-65535"
)
_NETWORK_FORMS = "use 'user' (the default: NAT, allows ports), 'none', or 'bridge=<name>' (e.g. 'bridge=br0')"


@dataclass(frozen=True)
class PortForward:
    """One forward from a host port to a guest port; ``host_port`` None means "choose a free one at start"."""

    guest_port: int
    host_port: int | None = None
    proto: Proto = "tcp"

    def spec(self) -> str:
        """The canonical argument form: ``2222:22``, ``22``, ``53/udp``, ``5353:53/udp``."""
        text = f"{self.host_port}:{self.guest_port}" if self.host_port is not None else str(self.guest_port)
        return text if self.proto == "tcp" else f"{text}/{self.proto}"

    def hostfwd(self, address: str, host_port: int) -> str:
        """The value of QEMU's ``-netdev user,hostfwd=``: ``tcp:127.0.0.1:2222-:22``.

        ``address`` is the host address to bind (127.0.0.1 unless a setting
        allows another); ``host_port`` is the port chosen for this forward.

        :raise ValueError: ``address`` is not an IPv4 address (QEMU's hostfwd
            takes IPv4 only); ``host_port`` is not 1-65535, or differs from a
            fixed ``self.host_port``.
        """
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ValueError(f"hostfwd address {address!r} must be an IPv4 address such as 127.0.0.1") from None
        if isinstance(host_port, bool) or not 1 <= host_port <= 65535:
            raise ValueError(f"host port {host_port!r} must be 1-65535")
        if self.host_port is not None and host_port != self.host_port:
            raise ValueError(f"forward {self.spec()} is fixed to host port {self.host_port}, not {host_port}")
        return f"{self.proto}:{address}:{host_port}-:{self.guest_port}"

    def summary(self) -> dict[str, Any]:
        """The forward as clients see it (the host port of a ``GUEST`` forward is None until the VM starts)."""
        return {"spec": self.spec(), "host_port": self.host_port, "guest_port": self.guest_port, "proto": self.proto}


def _parse_forward(item: object) -> PortForward:
    """:raise InvalidInput: ``item`` is not one of the accepted forms, or a port is out of range."""
    if not isinstance(item, str):
        shown = repr(item) if isinstance(item, int | float) else f"a {type(item).__name__}"
        raise InvalidInput("ports", f"entry {shown} is not a string; {_FORMS}")
    match = _FORWARD_RE.fullmatch(item.strip())
    shown = repr(item) if len(item) <= 40 else repr(item[:40] + "...")
    if not match:
        raise InvalidInput("ports", f"entry {shown} is not a port forward; {_FORMS}")
    host_text, guest_text, proto = match.groups()
    host = int(host_text) if host_text is not None else None
    guest = int(guest_text)
    for port in (host, guest):
        if port is not None and not 1 <= port <= 65535:
            raise InvalidInput("ports", f"entry {shown}: port {port} is out of range; ports are 1-65535")
    return PortForward(guest_port=guest, host_port=host, proto="udp" if proto == "udp" else "tcp")


def parse_ports(raw: object, *, max_forwards: int = MAX_FORWARDS) -> tuple[PortForward, ...]:
    """The ``ports`` argument (a list of strings; None or [] for none) → forwards, in the given order.

    :raise InvalidInput: ``raw`` is not a list; more than ``max_forwards``
        entries; an entry is malformed; two entries use the same host port and
        protocol, or the same guest port and protocol.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        raise InvalidInput("ports", f"must be a list of strings such as ['2222:22', '8080:80']; {_FORMS}")
    if len(raw) > max_forwards:
        raise InvalidInput("ports", f"{len(raw)} forwards given; at most {max_forwards} are accepted")
    forwards: list[PortForward] = []
    for item in raw:
        forward = _parse_forward(item)
        for earlier in forwards:
            if earlier.proto != forward.proto:
                continue
            if forward.host_port is not None and earlier.host_port == forward.host_port:
                raise InvalidInput(
                    "ports",
                    f"{forward.spec()!r} and {earlier.spec()!r} both use host port "
                    f"{forward.host_port}/{forward.proto}; give each host port once",
                )
            if earlier.guest_port == forward.guest_port:
                raise InvalidInput(
                    "ports",
                    f"{forward.spec()!r} and {earlier.spec()!r} both forward to guest port "
                    f"{forward.guest_port}/{forward.proto}; give each guest port once",
                )
        forwards.append(forward)
    return tuple(forwards)


@dataclass(frozen=True)
class NetworkSpec:
    """The guest's network: QEMU user networking (NAT), none, or a host bridge through QEMU's bridge helper."""

    mode: NetworkMode = "user"
    bridge: str | None = None

    def __post_init__(self) -> None:
        """:raise ValueError: ``bridge`` is given without mode ``bridge``, missing with it, or not an interface name."""
        if (self.mode == "bridge") != (self.bridge is not None):
            raise ValueError("a network has a bridge name exactly when its mode is 'bridge'")
        if self.mode not in ("user", "none", "bridge"):
            raise ValueError(f"unknown network mode {self.mode!r}")
        if self.bridge is not None and _bridge_problem(self.bridge):
            raise ValueError(f"bridge {self.bridge!r} is not a Linux interface name")

    def spec(self) -> str:
        """The canonical argument form: ``user``, ``none``, ``bridge=br0``."""
        return f"bridge={self.bridge}" if self.mode == "bridge" else self.mode

    def summary(self) -> dict[str, Any]:
        """The network as clients see it."""
        return {"mode": self.mode, "bridge": self.bridge}

    def to_json(self) -> dict[str, Any]:
        """What vm.json stores."""
        return {"mode": self.mode, "bridge": self.bridge}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkSpec:
        """:raise ValueError: the data is not a network this version understands."""
        if not isinstance(data, Mapping) or set(data) - {"mode", "bridge"}:
            raise ValueError("not a network definition: expected an object with 'mode' and 'bridge'")
        mode = data.get("mode", "user")
        bridge = data.get("bridge")
        if mode not in ("user", "none", "bridge") or not (bridge is None or isinstance(bridge, str)):
            raise ValueError("not a network definition: bad mode or bridge")
        return cls(mode=mode, bridge=bridge)


def _bridge_problem(name: str) -> str | None:
    """Why ``name`` is not a Linux interface name (``dev_valid_name``), or None when it is one."""
    if name in (".", "..") or not _BRIDGE_RE.fullmatch(name):
        return "must be 1-15 characters of A-Z a-z 0-9 _ . - not starting with '-' (and not '.' or '..')"
    return None


def parse_network(raw: object) -> NetworkSpec:
    """The ``network`` argument → a :class:`NetworkSpec`; None means ``user``.

    :raise InvalidInput: not a string, not one of ``user``, ``none``,
        ``bridge=<name>``, or a bridge name Linux would refuse.
    """
    if raw is None:
        return NetworkSpec()
    if not isinstance(raw, str):
        raise InvalidInput("network", f"must be a string; {_NETWORK_FORMS}")
    text = raw.strip()
    if text == "user":
        return NetworkSpec()
    if text == "none":
        return NetworkSpec(mode="none")
    kind, sep, name = text.partition("=")
    shown = repr(raw) if len(raw) <= 40 else repr(raw[:40] + "...")
    if kind.strip() != "bridge" or not sep:
        raise InvalidInput("network", f"{shown} is not a network; {_NETWORK_FORMS}")
    name = name.strip()
    problem = _bridge_problem(name)
    if problem:
        raise InvalidInput("network", f"bridge name {name[:40]!r} {problem}, e.g. 'bridge=br0'")
    return NetworkSpec(mode="bridge", bridge=name)


def check_ports_network(ports: tuple[PortForward, ...], network: NetworkSpec) -> None:
    """Port forwards need QEMU user networking.

    :raise InvalidInput: ``ports`` is not empty and ``network`` is not ``user``.
    """
    if ports and network.mode != "user":
        raise InvalidInput(
            "ports",
            f"forwards need network 'user' (QEMU's NAT); with network {network.spec()!r} reach the guest "
            "at its own address instead, or drop 'ports'",
        )
