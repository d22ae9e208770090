"""Opening one authenticated SSH connection: options, host-key policy, key loading, and the translation of
asyncssh's errors into ours (pyinfra's ``ssh_util`` split).

Host keys are checked against a known_hosts file (``strict``); ``accept-new`` trusts a host seen for the
first time and records its key; ``off`` checks nothing.  Neither the password nor the key's content is ever
put in a message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import asyncssh
from asyncssh.encryption import get_default_encryption_algs

from ..errors import CredentialUnusable, HostAuthFailed, HostError, HostKeyRejected, HostUnreachable
from .stats import PoolStats
from .target import PoolLimits, SSHTarget

__all__ = ["ClientHooks", "Connector"]

log = logging.getLogger(__name__)

_PREFERRED_ENCRYPTION = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_ENCRYPTION_ALGS = [
    *_PREFERRED_ENCRYPTION,
    *(alg.decode() for alg in get_default_encryption_algs() if alg.decode() not in _PREFERRED_ENCRYPTION),
]


class ClientHooks(asyncssh.SSHClient):
    """Connection hooks: notices a dropped connection; trusts a first-seen host key under ``accept-new``."""

    def __init__(self, accept_new: bool) -> None:
        self.accept_new = accept_new
        self.lost = False
        self.new_host_key: asyncssh.SSHKey | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Called only for a key that known_hosts does not list; accept-new trusts it when the host has no entry.
        if self.accept_new:
            self.new_host_key = key
            return True
        return False


class Connector:
    """Opens connections for a pool: its limits, its counters, and one lock on known_hosts appends."""

    def __init__(self, limits: PoolLimits, stats: PoolStats) -> None:
        self.limits = limits
        self.stats = stats
        self._known_hosts_lock = asyncio.Lock()

    async def open(self, target: SSHTarget) -> tuple[asyncssh.SSHClientConnection, ClientHooks]:
        """A new authenticated connection.

        :raise CredentialUnusable: the key file is missing, unreadable, encrypted or not a private key.
        :raise HostUnreachable: refused, unreachable, unresolvable, or no answer within the connect timeout.
        :raise HostKeyRejected: the host key is unknown or changed (and the policy does not allow it).
        :raise HostAuthFailed: the server refused the credentials.
        :raise HostError: any other SSH failure.
        """
        limits = self.limits
        timeout = limits.connect_timeout
        options: dict[str, Any] = {
            "username": target.user,
            "config": None,  # never ~/.ssh/config of the server's account
            "agent_path": None,  # never the server's agent
            "connect_timeout": timeout,
            "keepalive_interval": limits.keepalive_interval,
            "keepalive_count_max": 3,
            # AES-GCM first: as strong as chacha20-poly1305, and far cheaper per packet in asyncssh (one AEAD call
            # through cryptography rather than several cipher contexts), which matters for pipelined SFTP batches.
            "encryption_algs": _ENCRYPTION_ALGS,
        }
        if target.key_path:
            options.update(client_keys=[await _load_key(target.key_path)], preferred_auth="publickey", password=None)
        else:
            options.update(client_keys=None, password=target.password, preferred_auth="password,keyboard-interactive")
        known: asyncssh.SSHKnownHosts | None = None
        policy = limits.host_key_policy
        known_hosts_path = target.known_hosts or limits.known_hosts
        if policy != "off":
            try:
                known = await asyncio.to_thread(_read_known_hosts, known_hosts_path)
            except (OSError, ValueError) as exc:
                raise HostError(
                    f"cannot read the known_hosts file {known_hosts_path} (QEMU_MCP_SSH_KNOWN_HOSTS): {exc}"
                ) from exc
            options["known_hosts"] = known
        else:
            options["known_hosts"] = None
        accept_new = policy == "accept-new" and known is not None and not _host_known(known, target)
        client = ClientHooks(accept_new)
        self.stats.count(round_trips=4)  # TCP + version exchange, key exchange, auth, (keepalive-free) first reply
        try:
            async with asyncio.timeout(timeout + 1.0):
                conn = await asyncssh.connect(target.host, target.port, client_factory=lambda: client, **options)
        except Exception as exc:
            self.stats.count(connect_failures=1)
            raise _connect_error(exc, target, timeout, known, known_hosts_path) from exc
        self.stats.count(connections_opened=1)
        log.info("SSH connection to %s opened", target.label)
        if client.new_host_key is not None:
            await self._record_host_key(target, client.new_host_key)
        return conn, client

    async def _record_host_key(self, target: SSHTarget, key: asyncssh.SSHKey) -> None:
        path = target.known_hosts or self.limits.known_hosts
        name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
        line = f"{name} {key.export_public_key('openssh').decode().strip()}\n"
        async with self._known_hosts_lock:
            try:
                await asyncio.to_thread(_append_line, path, line)
            except OSError as exc:
                log.warning("could not record the host key of %s in %s: %s", name, path, exc.strerror)
                return
        log.warning("trusted the new host key of %s on first use (policy accept-new) and recorded it in %s", name, path)


# -- helpers (no secret ever reaches a message) -------------------------------------------------


async def _load_key(path: str) -> asyncssh.SSHKey:
    """:raise CredentialUnusable: missing, unreadable, passphrase-protected or not a private key."""
    try:
        return await asyncio.to_thread(_read_key, path)
    except FileNotFoundError as exc:
        raise CredentialUnusable(f"{path} does not exist on the server") from exc
    except OSError as exc:
        raise CredentialUnusable(f"{path} cannot be read by the server: {exc.strerror}") from exc
    except asyncssh.KeyImportError as exc:
        if "passphrase" in str(exc).lower():
            raise CredentialUnusable(f"{path} is passphrase-protected; give a key without a passphrase") from exc
        raise CredentialUnusable(f"{path} is not an SSH private key (OpenSSH or PEM format)") from exc


def _read_key(path: str) -> asyncssh.SSHKey:
    return asyncssh.read_private_key(os.path.expanduser(path), None)


def _read_known_hosts(path: str) -> asyncssh.SSHKnownHosts:
    """The known_hosts file; a missing file trusts nothing (never asyncssh's own default file)."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    return asyncssh.import_known_hosts(text)


def _host_known(known: asyncssh.SSHKnownHosts, target: SSHTarget) -> bool:
    """Whether known_hosts lists any key for the host (then a different key is a *changed* key)."""
    port = None if target.port == 22 else target.port
    keys, cas, *_ = known.match(target.host, _numeric(target.host), port)
    return bool(keys or cas)


def _numeric(host: str) -> str:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return ""
    return host


def _append_line(path: str, line: str) -> None:
    path = os.path.expanduser(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line)


def _connect_error(
    exc: BaseException,
    target: SSHTarget,
    timeout: float,
    known: asyncssh.SSHKnownHosts | None,
    known_hosts_path: str,
) -> Exception:
    where = f"{target.host}:{target.port}"
    if isinstance(exc, CredentialUnusable):
        return exc
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        keyscan = f"ssh-keyscan -p {target.port} {target.host} >> {known_hosts_path}"
        if known is not None and _host_known(known, target):
            return HostKeyRejected(
                f"the SSH host key of {where} has CHANGED: it differs from the one in {known_hosts_path} "
                "(a reinstalled host, or someone intercepting the connection); if the change is expected, "
                f"remove the old entry (ssh-keygen -R '[{target.host}]:{target.port}' -f {known_hosts_path}) "
                f"and add the new key after verifying it: {keyscan}"
            )
        return HostKeyRejected(
            f"the SSH host key of {where} is unknown (not in {known_hosts_path}); verify it and trust the host "
            f"with: {keyscan} -- or set QEMU_MCP_SSH_HOST_KEY_POLICY=accept-new to trust hosts on first use"
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        how = f"key {target.key_path}" if target.key_path else "password"
        return HostAuthFailed(
            f"SSH authentication as {target.user} on {where} failed with the given {how}; "
            "check ssh_user and the credential (the key wins when both ssh_key and ssh_pwd are given)"
        )
    if isinstance(exc, TimeoutError):
        return HostUnreachable(f"no SSH answer from {where} within {timeout:g} s; check host, port and firewall")
    if isinstance(exc, ConnectionRefusedError):
        return HostUnreachable(f"{where} refused the SSH connection; is sshd listening on port {target.port}?")
    if isinstance(exc, socket.gaierror):
        return HostUnreachable(f"cannot resolve host name {target.host!r}; check host")
    if isinstance(exc, OSError):
        return HostUnreachable(f"cannot reach {where}: {exc.strerror or exc}")
    if isinstance(exc, asyncssh.DisconnectError):
        return HostError(f"the SSH server at {where} closed the connection: {exc.reason}")
    if isinstance(exc, asyncssh.Error):
        return HostError(f"SSH to {where} failed: {exc.reason}")
    return HostError(f"SSH to {where} failed ({type(exc).__name__})")
