"""A remote machine as a :class:`Host`, over the pooled SSH connections of :mod:`.pool`.

- Commands: ``shlex.join(argv)``, so every argument reaches the remote program as it is and
  no string the client gave is interpreted by the remote shell.
- Files: one SFTP session per connection, shared; a batch of reads is pipelined (open, read
  until EOF, close, each stage for every file at once), so reading 3 or 300 files costs the
  same few round trips.  Writes are atomic (temp file, fsync, ``posix-rename``).
- Unix sockets (QMP, guest agent): a direct-streamlocal channel bridged to a local
  ``socket.socketpair()``, so qemu.qmp talks to the remote socket as if it were local.

A call that finds its connection dropped is retried once on a new connection when that
is safe: always for reads, stats and atomic writes; for a command only when the channel
was never opened (so the command cannot have run).

Why one module of 500 lines: it is one class implementing :class:`Host`, and every method shares
the retry rule above and the SFTP session; the pool, connecting, the scan and the stats live in
their own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import shlex
import socket
import stat as stat_mod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import asyncssh

from ..errors import (
    CommandFailed,
    HostError,
    OperationTimeout,
    SocketUnavailable,
)
from .base import OFF_LOOP_BYTES, SCAN_TOTAL_MAX, SMALL_FILE_MAX, FileLock, FileStat, Host, SubdirFiles
from .pool import SSHConnection, SSHPool, SSHTarget
from .scan import ScanChanged, parse_scan, scan_argv

__all__ = ["SSHHost"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes asked per SFTP read, below OpenSSH's per-read cap (256 KiB - 1 KiB): from a regular file a shorter
#: answer means end of file, so a small file costs one read.  /proc files (size 0, generated) are read to EOF.
READ_CHUNK = 64 * 1024


class _Lost(Exception):
    """``conn`` died under an operation; ``safe`` says whether a retry cannot repeat a side effect."""

    def __init__(self, conn: SSHConnection, safe: bool, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.conn = conn
        self.safe = safe


class SSHHost(Host):
    """VMs on a remote machine, reached as ``target`` through ``pool``."""

    def __init__(self, pool: SSHPool, target: SSHTarget) -> None:
        self.pool = pool
        self.target = target
        self.name = target.display
        # QMP connections are shared per remote account: QEMU serves one QMP client per socket.
        self.identity = target.account
        self.ssh_jump = target.label

    # -- plumbing --------------------------------------------------------------------------------

    async def _with_retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` (which picks a pooled connection); once more if that connection died and it is safe."""
        for attempt in (1, 2):
            try:
                return await op()
            except _Lost as lost:
                await self.pool.discard(lost.conn)
                if attempt == 2 or not lost.safe:
                    raise HostError(
                        f"the SSH connection to {self.name} was lost during {what}; "
                        + ("it may have run: check before retrying" if not lost.safe else "retry the call")
                    ) from lost.__cause__
                self.pool.stats.count(retries=1)
                log.info("SSH connection to %s lost during %s; retrying once on a new one", self.target.label, what)
        raise AssertionError("unreachable")  # pragma: no cover

    def _lost(self, conn: SSHConnection, exc: BaseException, safe: bool) -> _Lost | None:
        """``_Lost`` when ``exc`` means the connection (or its SFTP session) died, else ``None``."""
        dead = isinstance(
            exc, asyncssh.ConnectionLost | asyncssh.DisconnectError | asyncssh.SFTPConnectionLost | BrokenPipeError
        )
        if dead or not conn.alive:
            if isinstance(exc, asyncssh.SFTPConnectionLost):
                conn.forget_sftp()
            lost = _Lost(conn, safe, exc)
            lost.__cause__ = exc
            return lost
        return None

    # -- commands --------------------------------------------------------------------------------

    async def _exec(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None) -> tuple[int, bytes, bytes]:
        command = shlex.join(argv)

        async def attempt() -> tuple[int, bytes, bytes]:
            async with self.pool.exec_slot(self.target, timeout) as conn:
                return await self._exec_on(conn, argv, command, timeout, stdin)

        return await self._with_retry(argv[0], attempt)

    async def _exec_on(
        self, conn: SSHConnection, argv: Sequence[str], command: str, timeout: float, stdin: bytes | None
    ) -> tuple[int, bytes, bytes]:
        self.pool.stats.count(channels_opened=1, exec_requests=1, round_trips=3)  # open, exec, exit status
        try:
            async with asyncio.timeout(timeout):
                try:
                    proc = await conn.conn.create_process(command, encoding=None)
                except asyncssh.ChannelOpenError as exc:
                    lost = self._lost(conn, exc, safe=True)
                    if lost is not None:
                        raise lost from exc
                    raise HostError(f"cannot run {argv[0]} on {self.name}: {exc.reason}") from exc
                try:
                    if stdin:
                        proc.stdin.write(stdin)
                    proc.stdin.write_eof()
                    out, err = await proc.communicate()
                finally:
                    if proc.returncode is None and proc.exit_signal is None:
                        with contextlib.suppress(Exception):
                            proc.kill()  # sshd delivers the signal; closing the channel then ends the session
                    proc.close()
        except TimeoutError as exc:
            raise OperationTimeout(f"{argv[0]} did not finish within {timeout:g} s on {self.name}") from exc
        except (asyncssh.Error, OSError) as exc:
            lost = self._lost(conn, exc, safe=False)
            if lost is not None:
                raise lost from exc
            raise HostError(f"running {argv[0]} on {self.name} failed: {_reason(exc)}") from exc
        returncode = proc.returncode if proc.returncode is not None else -1
        return returncode, _bytes(out), _bytes(err)

    # -- locks -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock_file(self, path: str, *, timeout: float) -> AsyncIterator[FileLock]:
        """``flock`` held by a process on the host for the block (one channel of a pooled connection).

        The process ends, and the lock with it, when the block ends, when the channel or the connection
        closes, or when this server dies: another server (a replica) operating on the same remote VM waits
        for it. A host without ``flock`` (util-linux) or without the vm_dir yet gives a notional lock.
        """
        command = shlex.join(["sh", "-c", _LOCK_SCRIPT, "qemu-mcp-lock", path, str(max(0, math.ceil(timeout)))])
        async with self.pool.exec_slot(self.target, timeout) as conn:
            self.pool.stats.count(channels_opened=1, exec_requests=1, round_trips=2)
            try:
                proc = await asyncio.wait_for(conn.conn.create_process(command, encoding=None), timeout)
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                raise HostError(f"cannot take the lock {path} on {self.name}: {_reason(exc)}") from exc
            try:
                try:
                    # flock -w gives up at the timeout; the margin covers the round trips.
                    line = await asyncio.wait_for(proc.stdout.readline(), timeout + 10)
                except (asyncssh.Error, OSError, TimeoutError) as exc:
                    raise HostError(f"the lock {path} on {self.name} did not answer: {_reason(exc)}") from exc
                answer = _text(line).strip()
                if answer in ("NODIR", "NOFLOCK"):
                    if answer == "NOFLOCK":
                        log.warning("%s has no flock (util-linux): VM locks there hold within this server only",
                                    self.name)  # fmt: skip
                    yield FileLock(path, held=False)
                    return
                if answer == "TIMEOUT":
                    raise OperationTimeout(
                        f"another process held the lock {path} on {self.name} for more than {timeout:g} s"
                    )
                if answer != "LOCKED":
                    err = _text(await _drain(proc.stderr)).strip()
                    raise HostError(f"cannot take the lock {path} on {self.name}: {err or answer or 'no answer'}")
                lock = FileLock(path, held=True)
                try:
                    yield lock
                finally:
                    with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                        proc.stdin.write(b"remove\n" if lock.remove_on_release else b"keep\n")
                        proc.stdin.write_eof()
                        await asyncio.wait_for(proc.wait(), 5)
            finally:
                if proc.returncode is None and proc.exit_signal is None:
                    with contextlib.suppress(Exception):
                        proc.kill()
                proc.close()

    # -- files -----------------------------------------------------------------------------------

    async def _sftp_op(
        self, what: str, op: Callable[[asyncssh.SFTPClient], Awaitable[T]], timeout: float, safe: bool = True
    ) -> T:
        async def attempt() -> T:
            conn = await self.pool.connection(self.target)
            try:
                async with asyncio.timeout(timeout):
                    sftp = await conn.sftp(timeout)
                    return await op(sftp)
            except TimeoutError as exc:
                raise OperationTimeout(f"{what} on {self.name} did not finish within {timeout:g} s") from exc
            except (asyncssh.Error, OSError) as exc:
                lost = self._lost(conn, exc, safe)
                if lost is not None:
                    raise lost from exc
                raise HostError(f"{what} on {self.name} failed: {_reason(exc)}") from exc

        return await self._with_retry(what, attempt)

    async def read_files(
        self, paths: Sequence[str], *, timeout: float, max_bytes: int = SMALL_FILE_MAX
    ) -> Mapping[str, bytes | None]:
        unique = list(dict.fromkeys(paths))
        if not unique:
            return {}
        stats = self.pool.stats

        async def op(sftp: asyncssh.SFTPClient) -> dict[str, bytes | None]:
            stats.count(sftp_requests=len(unique), round_trips=1)
            opened = await asyncio.gather(*(_open_or_none(sftp, p) for p in unique))
            files = {p: f for p, f in zip(unique, opened, strict=True) if f is not None}
            data: dict[str, bytearray] = {p: bytearray() for p in files}
            pending = dict(files)
            try:
                while pending:
                    stats.count(sftp_requests=len(pending), round_trips=1)
                    chunks = await asyncio.gather(
                        *(f.read(READ_CHUNK, len(data[p])) for p, f in pending.items()), return_exceptions=True
                    )
                    for p, chunk in zip(list(pending), chunks, strict=True):
                        if isinstance(chunk, BaseException):
                            if not isinstance(chunk, asyncssh.SFTPError) or isinstance(
                                chunk, asyncssh.SFTPConnectionLost
                            ):
                                raise chunk
                            data.pop(p)  # unreadable: None, as for a missing file
                            del pending[p]
                        elif not chunk:
                            del pending[p]  # EOF
                        else:
                            data[p] += chunk if isinstance(chunk, bytes) else chunk.encode()
                            if len(data[p]) > max_bytes:
                                data.pop(p)
                                del pending[p]
                            elif len(chunk) < READ_CHUNK and not p.startswith("/proc/"):
                                del pending[p]  # a short read of a regular file is its end
            finally:
                # Closed without waiting for the replies: the server handles requests in order, so later
                # requests queue behind the closes, and the caller saves a round trip.
                stats.count(sftp_requests=len(files))
                if files:
                    self.pool.track(asyncio.ensure_future(_close_all(list(files.values()))))
            return {p: bytes(data[p]) if p in data else None for p in unique}

        return await self._sftp_op("reading files", op, timeout)

    async def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        directory, _, base = path.rpartition("/")
        tmp = f"{directory}/.{base}.{secrets.token_hex(4)}.tmp"
        stats = self.pool.stats

        async def op(sftp: asyncssh.SFTPClient) -> None:
            stats.count(sftp_requests=4, round_trips=4)
            try:
                async with sftp.open(tmp, "wb", asyncssh.SFTPAttrs(permissions=0o644)) as f:
                    await f.write(data)
                    with contextlib.suppress(asyncssh.SFTPOpUnsupported):
                        stats.count(sftp_requests=1, round_trips=1)
                        await f.fsync()
                await sftp.posix_rename(tmp, path)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(sftp.remove(tmp))
                raise

        await self._sftp_op(f"writing {path}", op, timeout)

    async def stat(self, path: str, *, timeout: float) -> FileStat | None:
        async def op(sftp: asyncssh.SFTPClient) -> FileStat | None:
            self.pool.stats.count(sftp_requests=1, round_trips=1)
            try:
                attrs = await sftp.lstat(path)
            except asyncssh.SFTPNoSuchFile:
                return None
            mode = attrs.permissions or 0
            return FileStat(
                size=attrs.size or 0,
                is_dir=stat_mod.S_ISDIR(mode),
                is_file=stat_mod.S_ISREG(mode),
                is_symlink=stat_mod.S_ISLNK(mode),
            )

        return await self._sftp_op(f"stat of {path}", op, timeout)

    async def list_dir(self, path: str, *, timeout: float) -> list[str]:
        async def op(sftp: asyncssh.SFTPClient) -> list[str]:
            self.pool.stats.count(sftp_requests=3, round_trips=3)  # opendir, readdir (until EOF), close
            try:
                names = await sftp.listdir(path)
            except asyncssh.SFTPNoSuchFile:
                return []
            return sorted(str(n) for n in names if n not in (".", ".."))

        return await self._sftp_op(f"listing {path}", op, timeout)

    async def scan_subdirs(
        self, directory: str, filenames: Sequence[str], *, pidfile: str, timeout: float
    ) -> dict[str, SubdirFiles]:
        # One exec instead of a listing and three batches of SFTP reads (13 round trips -> 3).
        wanted = list(dict.fromkeys([*filenames, pidfile]))
        argv = scan_argv(directory, wanted, pidfile, SMALL_FILE_MAX, SCAN_TOTAL_MAX)

        async def scan() -> dict[str, SubdirFiles]:
            for _ in range(3):
                returncode, out, err = await self._exec(argv, timeout=timeout, stdin=None)
                if returncode != 0:
                    raise CommandFailed(["sh"], returncode, err.decode(errors="replace"))
                try:
                    if len(out) <= OFF_LOOP_BYTES:
                        return parse_scan(out, filenames)
                    return await asyncio.to_thread(parse_scan, out, filenames)  # up to SCAN_TOTAL_MAX: not here
                except ScanChanged:
                    continue  # a VM started or stopped under the scan
            raise HostError(f"the files of {directory} on {self.name} kept changing while being read; retry")

        return await self.pool.coalescer.run((self.identity, *argv), scan)

    # -- unix sockets ----------------------------------------------------------------------------

    async def open_unix_socket(self, path: str, *, timeout: float) -> socket.socket:
        async def channel(conn: SSHConnection) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
            self.pool.stats.count(channels_opened=1, streamlocal_opens=1, round_trips=1)
            return await conn.conn.open_unix_connection(path, encoding=None)

        return await self._bridged(path, channel, timeout)

    async def open_tcp_socket(self, address: str, port: int, *, timeout: float) -> socket.socket:
        async def channel(conn: SSHConnection) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
            self.pool.stats.count(channels_opened=1, round_trips=1)
            return await conn.conn.open_connection(address, port, encoding=None)

        return await self._bridged(f"{address}:{port}", channel, timeout)

    async def _bridged(
        self,
        where: str,
        channel: Callable[[SSHConnection], Awaitable[tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]]],
        timeout: float,
    ) -> socket.socket:
        """A local socket whose peer is a channel of the pooled connection (to a unix or TCP socket there)."""

        async def attempt() -> socket.socket:
            conn = await self.pool.connection(self.target)
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await channel(conn)
            except TimeoutError as exc:
                raise SocketUnavailable(where, self.name, "timed out") from exc
            except (asyncssh.Error, OSError) as exc:
                lost = self._lost(conn, exc, safe=True)
                if lost is not None:
                    raise lost from exc
                raise SocketUnavailable(where, self.name, _reason(exc)) from exc
            return await self._bridge(reader, writer, where)

        return await self._with_retry(f"connecting to {where}", attempt)

    async def read_range(self, path: str, *, offset: int | None, length: int, timeout: float) -> tuple[bytes, int]:
        async def op(sftp: asyncssh.SFTPClient) -> tuple[bytes, int]:
            self.pool.stats.count(sftp_requests=4, round_trips=3)  # open, fstat + read (pipelined), close
            try:
                async with sftp.open(path, "rb", block_size=0) as f:
                    size = (await f.stat()).size or 0
                    start = max(0, size - length) if offset is None else offset
                    if start >= size:
                        return b"", size
                    data = await f.read(min(length, size - start), start)
            except asyncssh.SFTPNoSuchFile:
                return b"", 0
            return (data if isinstance(data, bytes) else data.encode()), size

        return await self._sftp_op(f"reading {path}", op, timeout)

    async def _bridge(
        self,
        reader: asyncssh.SSHReader[bytes],
        writer: asyncssh.SSHWriter[bytes],
        path: str,
    ) -> socket.socket:
        """One end of a socketpair for the caller; the other end pumped to and from the SSH channel."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.setblocking(False)
        try:
            local_reader, local_writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            writer.close()
            raise

        async def to_remote() -> None:
            try:
                while data := await local_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        async def to_local() -> None:
            try:
                while data := await reader.read(65536):
                    local_writer.write(data)
                    await local_writer.drain()
            finally:
                local_writer.close()

        async def pump() -> None:
            tasks = [asyncio.create_task(to_remote()), asyncio.create_task(to_local())]
            try:
                # Either side ending (the caller closed its socket, or QEMU / the connection went away) ends both.
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for result in results:
                    if isinstance(result, Exception) and not isinstance(result, asyncssh.Error | OSError):
                        log.debug("bridge to %s on %s ended: %r", path, self.name, result)
                writer.close()
                local_writer.close()

        task = asyncio.get_running_loop().create_task(pump(), name=f"ssh-bridge {self.name}:{path}")
        self.pool.track(task)
        return theirs


async def _close_all(files: list[asyncssh.SFTPClientFile]) -> None:
    await asyncio.gather(*(f.close() for f in files), return_exceptions=True)


async def _open_or_none(sftp: asyncssh.SFTPClient, path: str) -> asyncssh.SFTPClientFile | None:
    """An open file, or ``None`` when it is missing or unreadable (connection loss propagates)."""
    try:
        return await sftp.open(path, "rb", block_size=0)
    except asyncssh.SFTPConnectionLost:
        raise
    except asyncssh.SFTPError:
        return None


#: Holds ``flock`` on $1 (waiting at most $2 s) until a line comes on stdin ("remove": unlink it first, while
#: held) or stdin ends. A holder may have removed the file as it let go: only the file still at the path counts.
_LOCK_SCRIPT = r"""
p=$1 t=$2 d=${1%/*}
[ -d "${d%/*}" ] || { echo NODIR; exit 0; }
command -v flock >/dev/null 2>&1 || { echo NOFLOCK; exit 0; }
umask 077
mkdir -p -- "$d" || exit 3
end=$(( $(date +%s) + t ))
while :; do
    exec 9>>"$p" || exit 3
    left=$(( end - $(date +%s) )); [ "$left" -ge 0 ] || left=0
    flock -w "$left" 9 || { echo TIMEOUT; exit 0; }
    [ "$(stat -L -c %d:%i /proc/$$/fd/9)" = "$(stat -c %d:%i -- "$p" 2>/dev/null)" ] && break
    exec 9>&-
done
echo LOCKED
read -r how
[ "$how" = remove ] && rm -f -- "$p"
exit 0
"""


async def _drain(stream: asyncssh.SSHReader[bytes]) -> bytes:
    with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
        return await asyncio.wait_for(stream.read(4096), 2)
    return b""


def _bytes(data: bytes | str | None) -> bytes:
    if data is None:
        return b""
    return data if isinstance(data, bytes) else data.encode()


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
