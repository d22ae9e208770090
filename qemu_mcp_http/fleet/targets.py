"""The host a tool call asks for: its arguments (``host``, ``ssh_*``) and the named hosts of the settings."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import InvalidInput
from ..hosts.pool import SSHTarget

__all__ = ["GROUPS_KEY", "LOCAL_NAMES", "HostRequest", "NamedHost", "load_host_groups", "load_named_hosts"]

LOCAL_NAMES = ("", "localhost")
#: The hosts file's key for groups of hosts, ``{"groups": {"ci": ["ci1", "ci2"]}}`` (not a host's name).
GROUPS_KEY = "groups"


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
    #: The host's default vm_dir (calls without vm_dir, its vm:// resources); empty: the server's vm_dir.
    vm_dir: str = ""


def load_named_hosts(path: str) -> dict[str, NamedHost]:
    """Read ``{name: {address, port, user, key, known_hosts}}``.

    :raise ValueError: unreadable file or malformed entry (the message names it).
    """
    if not path:
        return {}
    raw = _read_hosts_file(path)
    hosts: dict[str, NamedHost] = {}
    allowed = {"address", "port", "user", "key", "known_hosts", "allowed_roots", "vm_dir"}
    for name, entry in raw.items():
        if name == GROUPS_KEY:
            continue
        if not isinstance(entry, dict) or not {"address", "user"} <= entry.keys() or not entry.keys() <= allowed:
            raise ValueError(
                f"ssh_hosts_file {path}: host {name!r} needs address and user, "
                "and may have port, key, known_hosts, allowed_roots, vm_dir"
            )
        try:
            hosts[str(name)] = NamedHost(
                address=str(entry["address"]),
                user=str(entry["user"]),
                port=int(entry.get("port", 22)),
                key=str(entry["key"]) if entry.get("key") else None,
                known_hosts=str(entry["known_hosts"]) if entry.get("known_hosts") else None,
                allowed_roots=_roots(entry.get("allowed_roots", [])),
                vm_dir=_absolute(entry.get("vm_dir", "")),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ssh_hosts_file {path}: host {name!r}: {exc}") from exc
    return hosts


def load_host_groups(path: str, hosts: Mapping[str, NamedHost]) -> dict[str, tuple[str, ...]]:
    """``{group: (host, ...)}`` from the hosts file's ``groups``; members are named hosts or ``localhost``.

    :raise ValueError: a malformed group or an unknown member (the message names it).
    """
    if not path:
        return {}
    raw = _read_hosts_file(path).get(GROUPS_KEY, {})
    if not isinstance(raw, dict):
        raise ValueError(f"ssh_hosts_file {path}: groups must be an object of lists of host names")
    groups: dict[str, tuple[str, ...]] = {}
    for group, members in raw.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValueError(f"ssh_hosts_file {path}: group {group!r} must be a list of host names")
        unknown = [m for m in members if m != "localhost" and m not in hosts]
        if unknown:
            raise ValueError(f"ssh_hosts_file {path}: group {group!r} names unknown hosts: {', '.join(unknown)}")
        groups[str(group)] = tuple(dict.fromkeys(members))
    return groups


def _read_hosts_file(path: str) -> dict[str, object]:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"ssh_hosts_file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"ssh_hosts_file {path}: expected an object of named hosts")
    return raw


def _absolute(raw: object) -> str:
    if raw == "":
        return ""
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise ValueError("vm_dir must be an absolute path")
    return raw


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

    def ssh_target(self, named: Mapping[str, NamedHost] | None = None, *, client_keys: bool = False) -> SSHTarget:
        """The SSH connection this request asks for; a named host fills in what the call leaves out.

        On a named host the entry's key logs in as the entry's user on the entry's port.  A call may log in
        as another user or on another port only with a credential of its own: ``ssh_pwd``, or an ``ssh_key``
        when ``client_keys`` (``--allow-client-ssh-keys``: the operator lets clients use the server's keys
        anywhere).  Otherwise a token limited to one host could try the operator's key as root, or on
        another port of that address.  A credential in the call replaces the named host's key (``ssh_key``
        wins over ``ssh_pwd``); ``ssh_port`` other than the default 22 replaces its port.

        :raise InvalidInput: host, ssh_user or the credential is missing or malformed, or the call changes a
            named host's user or port without a credential of its own.
        """
        host = (self.host or "").strip()
        entry = (named or {}).get(host)
        if entry is not None:
            user = self.ssh_user or entry.user
            port = self.ssh_port if self.ssh_port != 22 else entry.port
            # The key wins when both are given, so a password beside a server key is not a credential of its own.
            own_credential = bool(self.ssh_key and client_keys) or bool(self.ssh_pwd and not self.ssh_key)
            if (user, port) != (entry.user, entry.port) and not own_credential:
                field_name = "ssh_user" if user != entry.user else "ssh_port"
                raise InvalidInput(
                    field_name,
                    f"named host {host!r} logs in as its own user on its own port with the server's key; a call "
                    "may not change ssh_user or ssh_port unless it brings its own credential (ssh_pwd"
                    + (", or an ssh_key" if client_keys else "")
                    + f"): drop {field_name} to use the named host as configured",
                )
            return HostRequest(
                host=entry.address,
                ssh_port=port,
                ssh_user=user,
                ssh_pwd=self.ssh_pwd,
                ssh_key=self.ssh_key if (self.ssh_key or self.ssh_pwd) else entry.key,
            )._target(name=host, known_hosts=entry.known_hosts)
        return self._target()

    def _target(self, name: str = "", known_hosts: str | None = None) -> SSHTarget:
        host = (self.host or "").strip()
        if not host:
            raise InvalidInput("host", "give the remote host name or IP address")
        if host == "*" or host.startswith("@"):
            raise InvalidInput("host", f"{host!r} (every host, a group) is for list_vms only; name one host here")
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
