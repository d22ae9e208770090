"""The local machine as a :class:`Host`: asyncio subprocesses, file I/O off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import stat as stat_mod
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import HostError, OperationTimeout, SocketUnavailable
from .base import EXIT_NOT_FOUND, SCAN_TOTAL_MAX, SMALL_FILE_MAX, FileLock, FileStat, Host, SubdirFiles, parse_pid

__all__ = ["LocalHost"]

T = TypeVar("T")


class LocalHost(Host):
    """VMs on the machine the server runs on."""

    def __init__(self, name: str = "localhost") -> None:
        self.name = name
        self.identity = "local"

    async def _exec(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None) -> tuple[int, bytes, bytes]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a daemonized QEMU must not share our process group
            )
        except FileNotFoundError:
            return EXIT_NOT_FOUND, b"", f"{argv[0]}: not found".encode()
        except OSError as exc:
            raise HostError(f"cannot run {argv[0]} on {self.name}: {exc.strerror}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError as exc:
            raise OperationTimeout(f"{argv[0]} did not finish within {timeout:g} s on {self.name}") from exc
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode, out, err

    async def read_files(
        self, paths: Sequence[str], *, timeout: float, max_bytes: int = SMALL_FILE_MAX
    ) -> Mapping[str, bytes | None]:
        return await self._off_loop(_read_files, list(paths), max_bytes, timeout=timeout)

    async def realpath(self, paths: Sequence[str], *, timeout: float) -> list[str]:
        return await self._off_loop(lambda: [os.path.realpath(p) for p in paths], timeout=timeout)

    async def scan_subdirs(
        self, directory: str, filenames: Sequence[str], *, pidfile: str, timeout: float
    ) -> dict[str, SubdirFiles]:
        # One trip off the loop for the whole directory: list_vms of 100 VMs is then a few hundred syscalls.
        return await self._off_loop(_scan_subdirs, directory, tuple(filenames), pidfile, timeout=timeout)

    async def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        await self._off_loop(_write_atomic, path, data, timeout=timeout)

    async def stat(self, path: str, *, timeout: float) -> FileStat | None:
        return await self._off_loop(_lstat, path, timeout=timeout)

    async def list_dir(self, path: str, *, timeout: float) -> list[str]:
        return await self._off_loop(_list_dir, path, timeout=timeout)

    async def open_unix_socket(self, path: str, *, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise SocketUnavailable(path, self.name, _reason(exc)) from exc
        except BaseException:
            sock.close()
            raise
        return sock

    async def open_tcp_socket(self, address: str, port: int, *, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise SocketUnavailable(f"{address}:{port}", self.name, _reason(exc)) from exc
        except BaseException:
            sock.close()
            raise
        return sock

    async def read_range(self, path: str, *, offset: int | None, length: int, timeout: float) -> tuple[bytes, int]:
        return await self._off_loop(_read_range, path, offset, length, timeout=timeout)

    @contextlib.asynccontextmanager
    async def lock_file(self, path: str, *, timeout: float) -> AsyncIterator[FileLock]:
        deadline = time.monotonic() + timeout
        while True:
            fd = await self._off_loop(_open_lock_file, path, timeout=timeout)
            if fd is None:
                yield FileLock(path, held=False)
                return
            try:
                while True:
                    try:
                        # Non-blocking attempts polled on the loop: flock itself never blocks here.
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise OperationTimeout(
                                f"another process held the lock {path} on {self.name} for more than {timeout:g} s"
                            ) from None
                        await asyncio.sleep(0.05)
                # A holder may have removed the file as it let go: the lock held is then on a file nobody
                # else will open again. Only the file that is still at ``path`` counts.
                if not _same_file(fd, path):
                    continue
                lock = FileLock(path, held=True)
                try:
                    yield lock
                finally:
                    if lock.remove_on_release:
                        with contextlib.suppress(OSError):
                            os.unlink(path)  # while still holding it: a waiter then sees another file, or none
                return
            finally:
                os.close(fd)  # closing the descriptor releases the lock

    async def _off_loop(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout)
        except TimeoutError as exc:
            raise OperationTimeout(f"file operation on {self.name} did not finish within {timeout:g} s") from exc
        except OSError as exc:
            raise HostError(f"file operation on {self.name} failed: {exc}") from exc


def _open_lock_file(path: str) -> int | None:
    directory = os.path.dirname(path)
    if not os.path.isdir(os.path.dirname(directory)):
        # No vm_dir yet, so no VM to guard; creating it here would be a side effect of a typo.
        return None
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _read_files(paths: list[str], max_bytes: int) -> dict[str, bytes | None]:
    return {path: _read_small(path, max_bytes) for path in paths}


def _read_small(path: str, max_bytes: int) -> bytes | None:
    """A regular file's content, or ``None``: missing, unreadable, a link, a FIFO or device, or too big.

    O_NONBLOCK: opening a FIFO planted under a managed name must not block a thread forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        # /proc files report size 0: read until EOF, but never past the limit.
        while chunk := os.read(fd, min(65536, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_range(path: str, offset: int | None, length: int) -> tuple[bytes, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return b"", 0
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        start = max(0, st.st_size - length) if offset is None else offset
        if start >= st.st_size:
            return b"", st.st_size
        return os.pread(fd, min(length, st.st_size - start), start), st.st_size
    finally:
        os.close(fd)


def _scan_subdirs(
    directory: str, filenames: tuple[str, ...], pidfile: str, max_total: int = SCAN_TOTAL_MAX
) -> dict[str, SubdirFiles]:
    """Every subdirectory's small files, at most ``max_total`` bytes of them all (the rest: too big)."""
    total = 0
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return {}
    found: dict[str, SubdirFiles] = {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            found[entry.name] = SubdirFiles(dict.fromkeys(filenames), None, is_symlink=True)
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        files: dict[str, bytes | None] = {}
        oversized: set[str] = set()
        for filename in dict.fromkeys([*filenames, pidfile]):
            path = f"{entry.path}/{filename}"
            files[filename] = _read_small(path, min(SMALL_FILE_MAX, max_total - total))
            if files[filename] is None and _is_big_file(path, min(SMALL_FILE_MAX, max_total - total)):
                oversized.add(filename)
            total += len(files[filename] or b"")
        pid = parse_pid(files.get(pidfile))
        cmdline = _read_small(f"/proc/{pid}/cmdline", SMALL_FILE_MAX) if pid is not None else None
        found[entry.name] = SubdirFiles(
            {f: files.get(f) for f in filenames}, cmdline, oversized=frozenset(oversized & set(filenames))
        )
    return found


def _is_big_file(path: str, max_bytes: int = SMALL_FILE_MAX) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat_mod.S_ISREG(st.st_mode) and st.st_size > max_bytes


def _write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _lstat(path: str) -> FileStat | None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    return FileStat(
        size=st.st_size,
        is_dir=stat_mod.S_ISDIR(st.st_mode),
        is_file=stat_mod.S_ISREG(st.st_mode),
        is_symlink=stat_mod.S_ISLNK(st.st_mode),
    )


def _list_dir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
