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

from ..errors import (
    CommandFailed,
    HostError,
    OperationTimeout,
    QemuNotInstalled,
    QMPUnavailable,
)
from .base import CommandResult, FileStat, Host

__all__ = ["LocalHost"]

T = TypeVar("T")


class LocalHost(Host):
    """VMs on the machine the server runs on."""

    def __init__(self, name: str = "localhost") -> None:
        self.name = name

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        check: bool = True,
        stdin: bytes | None = None,
    ) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a daemonized QEMU must not share our process group
            )
        except FileNotFoundError as exc:
            raise QemuNotInstalled(argv[0], self.name) from exc
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
        result = CommandResult(
            tuple(argv),
            proc.returncode,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise CommandFailed(argv, result.returncode, result.stderr)
        return result

    async def read_files(self, paths: Sequence[str], *, timeout: float) -> Mapping[str, bytes | None]:
        return await self._off_loop(_read_files, list(paths), timeout=timeout)

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
            raise QMPUnavailable(f"no QMP endpoint at {path} on {self.name}: {_reason(exc)}") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    @contextlib.asynccontextmanager
    async def lock_file(self, path: str, *, timeout: float) -> AsyncIterator[bool]:
        fd = await self._off_loop(_open_lock_file, path, timeout=timeout)
        if fd is None:
            yield False
            return
        try:
            deadline = time.monotonic() + timeout
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
            yield True
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


def _read_files(paths: list[str]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                out[path] = f.read()
        except OSError:
            out[path] = None
    return out


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
