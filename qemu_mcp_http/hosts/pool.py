"""Pooled asyncssh connections: one per (host, port, user, credential), shared by every call.

A connection carries many channels at once: exec sessions (bounded per connection,
below sshd's ``MaxSessions``), one SFTP session that every file operation shares, and
direct-streamlocal channels to the VMs' unix sockets.  When every exec slot of every
connection to a target is busy, a further connection is opened, up to the per-host
limit; then calls wait (within their timeout).  Connections are kept alive, closed
after an idle time, and replaced when they drop.

Host keys are checked against a known_hosts file (``strict``); ``accept-new`` trusts
a host seen for the first time and records its key; ``off`` checks nothing.  Neither
the password nor the key's content is ever put in a message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import asyncssh
from asyncssh.encryption import get_default_encryption_algs

from ..config import Settings
from ..errors import (
    HostAuthFailed,
    HostError,
    HostKeyRejected,
    HostUnreachable,
    InvalidInput,
    OperationTimeout,
    QemuMcpError,
)

__all__ = ["PoolLimits", "PoolStats", "SSHConnection", "SSHPool", "SSHTarget"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_PREFERRED_ENCRYPTION = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_ENCRYPTION_ALGS = [
    *_PREFERRED_ENCRYPTION,
    *(alg.decode() for alg in get_default_encryption_algs() if alg.decode() not in _PREFERRED_ENCRYPTION),
]

#: Per-process secret: a password's identity in the pool is an HMAC, never the password or a plain hash.
_IDENTITY_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class SSHTarget:
    """Where and as whom to connect; ``repr`` never shows the password.

    The key wins when both ``key_path`` and ``password`` are given: only the key is offered.
    """

    host: str
    port: int
    user: str
    password: str | None = field(default=None, repr=False)
    key_path: str | None = None
    #: The name clients use (a named host's name); the address otherwise.
    name: str = ""
    #: known_hosts of this target (a named host's own); the pool's setting otherwise.
    known_hosts: str | None = None

    @property
    def display(self) -> str:
        return self.name or self.host

    @property
    def label(self) -> str:
        """``user@host:port``, for messages and logs."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def account(self) -> str:
        """The remote account, whatever credential reached it (QMP sessions are shared per account)."""
        return f"ssh://{self.label}"

    @property
    def credential_id(self) -> str:
        if self.key_path:
            return "key:" + os.path.realpath(os.path.expanduser(self.key_path))
        digest = hmac.new(_IDENTITY_KEY, (self.password or "").encode(), hashlib.sha256).hexdigest()[:16]
        return "pwd:" + digest

    @property
    def pool_key(self) -> tuple[str, int, str, str, str]:
        return (self.host, self.port, self.user, self.credential_id, self.known_hosts or "")


@dataclass(frozen=True)
class PoolLimits:
    """The pool's settings, validated once with :class:`Settings`."""

    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    keepalive_interval: float = 15.0
    max_connections_per_host: int = 4
    max_channels_per_connection: int = 8
    known_hosts: str = "~/.ssh/known_hosts"
    host_key_policy: str = "strict"

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolLimits:
        return cls(
            connect_timeout=settings.ssh_connect_timeout,
            idle_timeout=settings.ssh_idle_timeout,
            keepalive_interval=settings.ssh_keepalive_interval,
            max_connections_per_host=settings.ssh_max_connections_per_host,
            max_channels_per_connection=settings.ssh_max_channels_per_connection,
            known_hosts=settings.ssh_known_hosts,
            host_key_policy=settings.ssh_host_key_policy,
        )

    @property
    def exec_slots(self) -> int:
        """Exec channels per connection: the SFTP session holds one of the channel budget."""
        return max(1, self.max_channels_per_connection - 1)


@dataclass
class PoolStats:
    """Counters of the pool's network work (for ``/healthz`` and the benchmark).

    ``round_trips`` counts the sequential waits on the network a caller pays: a channel open,
    an exec request, the wait for a command's exit, one stage of pipelined SFTP requests.
    """

    connections_opened: int = 0
    connections_closed: int = 0
    #: Tool calls that found a live connection to their target (no handshake paid).
    connections_reused: int = 0
    connect_failures: int = 0
    channels_opened: int = 0
    exec_requests: int = 0
    sftp_requests: int = 0
    streamlocal_opens: int = 0
    round_trips: int = 0
    retries: int = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Client(asyncssh.SSHClient):
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


class SSHConnection:
    """One pooled connection: its exec slots, its shared SFTP session, its liveness."""

    def __init__(self, conn: asyncssh.SSHClientConnection, client: _Client, target: SSHTarget, stats: PoolStats):
        self.conn = conn
        self.client = client
        self.target = target
        self.stats = stats
        self.busy = 0
        self.last_used = asyncio.get_running_loop().time()
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()
        self._closed = False

    @property
    def alive(self) -> bool:
        return not (self._closed or self.client.lost)

    def touch(self) -> None:
        self.last_used = asyncio.get_running_loop().time()

    async def sftp(self, timeout: float) -> asyncssh.SFTPClient:
        """The connection's SFTP session, started on first use and then shared.

        :raise OperationTimeout: the SFTP subsystem did not start in time.
        :raise asyncssh.Error: the connection failed (the caller maps it).
        """
        async with self._sftp_lock:
            if self._sftp is None:
                self.stats.channels_opened += 1
                self.stats.round_trips += 3  # channel open, subsystem request, SFTP init
                try:
                    self._sftp = await asyncio.wait_for(self.conn.start_sftp_client(), timeout)
                except TimeoutError as exc:
                    raise OperationTimeout(
                        f"SFTP on {self.target.host} did not start within {timeout:g} s "
                        "(is the sftp subsystem enabled in sshd_config?)"
                    ) from exc
            return self._sftp

    def forget_sftp(self) -> None:
        """Drop a broken SFTP session; the next file operation starts a new one."""
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None

    async def aclose(self, timeout: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.stats.connections_closed += 1
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        self.conn.close()
        try:
            await asyncio.wait_for(self.conn.wait_closed(), timeout)
        except Exception:
            log.debug("SSH connection to %s did not close cleanly", self.target.label, exc_info=True)


@dataclass
class _Slot:
    """The connections of one (host, port, user, credential)."""

    target: SSHTarget
    conns: list[SSHConnection] = field(default_factory=list)
    users: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    #: The connect in flight: concurrent callers share it (and its failure) instead of queueing their own.
    pending: asyncio.Task[SSHConnection] | None = None

    def live(self) -> list[SSHConnection]:
        self.conns[:] = [c for c in self.conns if c.alive]
        return list(self.conns)


class Coalescer:
    """Concurrent identical reads share one run that began after each of them asked.

    A caller never gets an answer read before it called: if a run is under way, callers
    wait for it to end and share the next one. So 20 concurrent ``list_vms`` of one
    ``vm_dir`` cost at most two remote scans, and no extra channels or connections.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}
        self._next: dict[Hashable, asyncio.Future[Any]] = {}

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        shared = self._next.get(key)
        if shared is None:
            shared = self._next[key] = asyncio.ensure_future(self._after_current(key, fn))
            # Retrieved here too, so a run whose callers all gave up logs no "exception never retrieved".
            shared.add_done_callback(lambda f: f.cancelled() or f.exception())
        # shield: one caller giving up (cancelled) must not cancel the others' run.
        return cast(T, await asyncio.shield(shared))

    async def _after_current(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        current = self._running.get(key)
        if current is not None:
            await asyncio.wait([current])  # it began before some of our callers asked
        me = self._next.pop(key)
        self._running[key] = me
        try:
            return await fn()
        finally:
            if self._running.get(key) is me:
                del self._running[key]


class SSHPool:
    """Every SSH connection of the server.  Close it with :meth:`aclose`."""

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.stats = PoolStats()
        self._slots: dict[tuple[str, int, str, str, str], _Slot] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._known_hosts_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Concurrent identical reads (list_vms of one vm_dir) share one run; see :class:`Coalescer`.
        self.coalescer = Coalescer()

    # -- leases ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, target: SSHTarget) -> AsyncIterator[None]:
        """Hold ``target`` for a tool call: connect (or reuse) now, so that bad credentials fail first.

        While held, its connections are not closed for idleness.

        :raise HostAuthFailed, HostKeyRejected, HostUnreachable, InvalidInput, HostError: see :meth:`connection`.
        """
        slot = self._slot(target)
        slot.users += 1
        try:
            if slot.live():
                self.stats.connections_reused += 1
            await self.connection(target)
            yield
        finally:
            slot.users -= 1
            for conn in slot.conns:
                conn.touch()

    async def connection(self, target: SSHTarget) -> SSHConnection:
        """The least busy live connection to ``target``, opening the first one if needed."""
        slot = self._slot(target)
        live = slot.live()
        if live:
            return min(live, key=lambda c: c.busy)
        return await self._connect(slot)

    async def _connect(self, slot: _Slot) -> SSHConnection:
        """Open a connection for ``slot``, or join the one being opened; every joiner gets its outcome."""
        if slot.pending is None:
            task = asyncio.get_running_loop().create_task(self._open(slot.target), name="ssh-connect")
            slot.pending = task

            def done(t: asyncio.Task[SSHConnection]) -> None:
                slot.pending = None
                if not t.cancelled() and t.exception() is None:
                    slot.conns.append(t.result())

            task.add_done_callback(done)
        return await asyncio.shield(slot.pending)

    @contextlib.asynccontextmanager
    async def exec_slot(self, target: SSHTarget, timeout: float) -> AsyncIterator[SSHConnection]:
        """A connection with a free exec channel, held for the block.

        Opens a further connection when all are busy and the per-host limit allows; otherwise waits.

        :raise OperationTimeout: no channel came free within ``timeout``.
        """
        slot = self._slot(target)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn: SSHConnection | None = None
        while conn is None:
            live = slot.live()
            free = [c for c in live if c.busy < self.limits.exec_slots]
            if free:
                conn = min(free, key=lambda c: c.busy)
            elif slot.pending is not None or len(live) < self.limits.max_connections_per_host:
                try:
                    await self._connect(slot)  # a further connection (or join the one being opened)
                except QemuMcpError:
                    if not live:
                        raise
                    log.info("could not open a further SSH connection to %s; waiting for a channel", target.label)
                    await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
                continue
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise OperationTimeout(
                        f"no free SSH channel to {target.host} within {timeout:g} s "
                        f"({self.limits.max_connections_per_host} connections x {self.limits.exec_slots} "
                        "channels busy); retry later or raise QEMU_MCP_SSH_MAX_CONNECTIONS_PER_HOST"
                    )
                async with slot.changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(slot.changed.wait(), min(remaining, 1.0))
        conn.busy += 1
        try:
            yield conn
        finally:
            conn.busy -= 1
            conn.touch()
            async with slot.changed:
                slot.changed.notify()

    async def discard(self, conn: SSHConnection) -> None:
        """Drop a connection found dead (or broken); the next call opens a new one."""
        slot = self._slots.get(conn.target.pool_key)
        if slot is not None and conn in slot.conns:
            slot.conns.remove(conn)
        log.info("SSH connection to %s dropped; it will be reopened on next use", conn.target.label)
        await conn.aclose()

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a background task (a socket bridge) until it ends; :meth:`aclose` cancels what is left."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _slot(self, target: SSHTarget) -> _Slot:
        slot = self._slots.get(target.pool_key)
        if slot is None:
            slot = self._slots[target.pool_key] = _Slot(target)
        return slot

    # -- health ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters and open connections per ``user@host:port`` (no credential in it)."""
        hosts: dict[str, int] = {}
        for slot in self._slots.values():
            n = len(slot.live())
            if n:
                hosts[slot.target.label] = hosts.get(slot.target.label, 0) + n
        return {**self.stats.snapshot(), "open_connections": sum(hosts.values()), "hosts": hosts}

    # -- connecting ------------------------------------------------------------------------------

    async def _open(self, target: SSHTarget) -> SSHConnection:
        """A new authenticated connection.

        :raise InvalidInput: the key file is missing, unreadable, encrypted or not a private key.
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
        client = _Client(accept_new)
        self.stats.round_trips += 4  # TCP + version exchange, key exchange, auth, (keepalive-free) first reply
        try:
            async with asyncio.timeout(timeout + 1.0):
                conn = await asyncssh.connect(target.host, target.port, client_factory=lambda: client, **options)
        except Exception as exc:
            self.stats.connect_failures += 1
            raise _connect_error(exc, target, timeout, known, known_hosts_path) from exc
        self.stats.connections_opened += 1
        log.info("SSH connection to %s opened", target.label)
        if client.new_host_key is not None:
            await self._record_host_key(target, client.new_host_key)
        self._start_reaper()
        return SSHConnection(conn, client, target, self.stats)

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

    # -- idle connections ------------------------------------------------------------------------

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="ssh-pool-reaper")

    async def _reap(self) -> None:
        period = max(0.5, min(self.limits.idle_timeout / 4, 30.0))
        while True:
            await asyncio.sleep(period)
            await self.close_idle()

    async def close_idle(self) -> int:
        """Close connections unused for the idle time (none while a call holds their target)."""
        now = asyncio.get_running_loop().time()
        closed = 0
        for key, slot in list(self._slots.items()):
            if not slot.conns and not slot.users and slot.pending is None:
                del self._slots[key]  # e.g. the slot of a wrong password
                continue
            for conn in list(slot.conns):
                idle = not conn.busy and not slot.users and now - conn.last_used >= self.limits.idle_timeout
                if not conn.alive or idle:
                    slot.conns.remove(conn)
                    if idle:
                        log.info("closing SSH connection to %s (idle)", conn.target.label)
                    await conn.aclose()
                    closed += 1
        return closed

    async def aclose(self) -> None:
        """Close every connection (running VMs keep running)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            if slot.pending is not None:
                slot.pending.cancel()
                await asyncio.gather(slot.pending, return_exceptions=True)
            for conn in slot.conns:
                await conn.aclose()


# -- helpers (no secret ever reaches a message) -------------------------------------------------


async def _load_key(path: str) -> asyncssh.SSHKey:
    """:raise InvalidInput: missing, unreadable, passphrase-protected or not a private key."""
    try:
        return await asyncio.to_thread(_read_key, path)
    except FileNotFoundError as exc:
        raise InvalidInput("ssh_key", f"{path} does not exist on the server") from exc
    except OSError as exc:
        raise InvalidInput("ssh_key", f"{path} cannot be read by the server: {exc.strerror}") from exc
    except asyncssh.KeyImportError as exc:
        if "passphrase" in str(exc).lower():
            raise InvalidInput("ssh_key", f"{path} is passphrase-protected; give a key without a passphrase") from exc
        raise InvalidInput("ssh_key", f"{path} is not an SSH private key (OpenSSH or PEM format)") from exc


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
    if isinstance(exc, InvalidInput):
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
