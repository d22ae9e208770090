"""The host seam: what VM operations need from a machine, local or remote.

Operations receive a :class:`Host` and never know which kind they have.
Commands are argv lists, never shell strings; over SSH each argument is
``shlex.quote``d by the implementation.
"""

from __future__ import annotations

import abc
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

__all__ = ["CommandResult", "FileStat", "Host", "SubdirFiles", "parse_pid"]


@dataclass(frozen=True)
class CommandResult:
    """Outcome of a finished command, shaped like ``subprocess.CompletedProcess``."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class FileStat:
    size: int
    is_dir: bool
    is_file: bool
    is_symlink: bool


@dataclass(frozen=True)
class SubdirFiles:
    """What :meth:`Host.scan_subdirs` found in one subdirectory."""

    #: filename -> content; ``None`` when missing or unreadable.
    files: Mapping[str, bytes | None]
    #: ``/proc/<pid>/cmdline`` of the pid held by the pid file, when such a process exists.
    cmdline: bytes | None


class Host(abc.ABC):
    """A machine on which VMs live."""

    #: Name shown to clients (``data.host``).
    name: str

    @abc.abstractmethod
    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        check: bool = True,
        stdin: bytes | None = None,
    ) -> CommandResult:
        """Run ``argv`` (no shell) and wait for it.

        :raise QemuNotInstalled: ``argv[0]`` does not exist on the host (exit 127).
        :raise CommandFailed: non-zero exit and ``check`` is true.
        :raise OperationTimeout: it ran longer than ``timeout``; it has been killed.
        :raise HostError: the host could not run it at all.
        """

    @abc.abstractmethod
    async def read_files(self, paths: Sequence[str], *, timeout: float) -> Mapping[str, bytes | None]:
        """Read several small files in one go; a missing or unreadable file maps to ``None``."""

    @abc.abstractmethod
    async def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        """Replace ``path`` atomically (temp file, fsync, rename): readers see old or new, never half."""

    @abc.abstractmethod
    async def stat(self, path: str, *, timeout: float) -> FileStat | None:
        """``lstat`` of ``path``, or ``None`` when it does not exist."""

    @abc.abstractmethod
    async def list_dir(self, path: str, *, timeout: float) -> list[str]:
        """Names in directory ``path``; ``[]`` when it does not exist."""

    @abc.abstractmethod
    async def open_unix_socket(self, path: str, *, timeout: float) -> socket.socket:
        """A connected stream socket to the unix socket ``path`` on the host.

        :raise QMPUnavailable: nothing listens there.
        """

    async def scan_subdirs(
        self, directory: str, filenames: Sequence[str], *, pidfile: str, timeout: float
    ) -> dict[str, SubdirFiles]:
        """Every subdirectory of ``directory`` (dot names skipped) with its small files ``filenames``,
        and the command line of the process whose pid its ``pidfile`` holds: ``list_vms`` in one go.

        This default composes the primitives (a few batched reads); remote hosts override it
        with a single round trip.
        """
        names = [n for n in await self.list_dir(directory, timeout=timeout) if not n.startswith(".")]
        wanted = list(dict.fromkeys([*filenames, pidfile]))
        paths = {(n, f): f"{directory}/{n}/{f}" for n in names for f in wanted}
        raws = await self.read_files(list(paths.values()), timeout=timeout) if paths else {}
        found: dict[str, dict[str, bytes | None]] = {n: {} for n in names}
        for (n, f), path in paths.items():
            found[n][f] = raws.get(path)
        # Names with no file at all may be plain files (disks, ISOs): keep only directories.
        for n in [n for n, files in found.items() if not any(v is not None for v in files.values())]:
            st = await self.stat(f"{directory}/{n}", timeout=timeout)
            if st is None or not st.is_dir:
                del found[n]
        pids = {n: parse_pid(files.get(pidfile)) for n, files in found.items()}
        procs = {n: f"/proc/{pid}/cmdline" for n, pid in pids.items() if pid is not None}
        cmdlines = await self.read_files(list(procs.values()), timeout=timeout) if procs else {}
        return {
            n: SubdirFiles({f: files.get(f) for f in filenames}, cmdlines.get(procs[n]) if n in procs else None)
            for n, files in found.items()
        }

    @asynccontextmanager
    async def lock_file(self, path: str, *, timeout: float) -> AsyncIterator[bool]:
        """Hold an exclusive lock on ``path`` across processes of this host; yields whether it is held.

        Callers still serialize within the server; this guards against a second server process
        sharing the same ``vm_dir``. Hosts that cannot lock yield ``False``.

        :raise OperationTimeout: another process held the lock for longer than ``timeout``.
        """
        yield False

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op for hosts that hold nothing
        """Release what the host holds (pooled hosts return their connection)."""

    async def __aenter__(self) -> Host:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def parse_pid(raw: bytes | None) -> int | None:
    """The pid in a pid file's content, or ``None`` when there is none."""
    if raw is None:
        return None
    try:
        pid = int(raw.decode().strip())
    except ValueError:
        return None
    return pid if pid > 0 else None
