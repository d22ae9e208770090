"""The host seam: what VM operations need from a machine, local or remote.

Operations receive a :class:`Host` and never know which kind they have.
Commands are argv lists, never shell strings; over SSH each argument is
``shlex.quote``d by the implementation.
"""

from __future__ import annotations

import abc
import asyncio
import socket
import stat as stat_mod
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

from ..errors import CommandFailed, CommandNotFound, HostError

__all__ = [
    "OFF_LOOP_BYTES",
    "SCAN_TOTAL_MAX",
    "SMALL_FILE_MAX",
    "CommandResult",
    "FileLock",
    "FileStat",
    "Host",
    "SubdirFiles",
    "parse_pid",
]

#: Largest file :meth:`Host.read_files` returns by default. Definitions, pid files, run-time facts and /proc
#: files are far smaller; a bigger file (planted, or grown by mistake) is not read at all, so that one call
#: can never make the server read gigabytes.
SMALL_FILE_MAX = 1 << 20
#: The most a directory scan reads of all its VMs' files together (ordinary VMs take ~5 KiB: 64 MiB is ~12,000
#: of them); files beyond it are reported as too big (their VMs unreadable), so a host padding thousands of
#: definitions to SMALL_FILE_MAX cannot make one scan read gigabytes.
SCAN_TOTAL_MAX = 64 << 20
#: Input larger than this is parsed in a worker thread rather than on the event loop (a few ms of work).
OFF_LOOP_BYTES = 1 << 20
#: The exit status of a command that does not exist (a shell's convention).
EXIT_NOT_FOUND = 127
_KIND = {stat_mod.S_IFREG: "file", stat_mod.S_IFLNK: "link", stat_mod.S_IFDIR: "dir"}


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
    #: The subdirectory is a symbolic link: nothing in it was read (it is not a VM directory).
    is_symlink: bool = False
    #: Files present but larger than the size limit, so not read.
    oversized: frozenset[str] = frozenset()


class Host(abc.ABC):
    """A machine on which VMs live."""

    #: Name shown to clients (``data.host``).
    name: str
    #: What makes two hosts the same machine and account (per-VM locks and QMP connections are shared by it).
    identity: str
    #: ``user@host:port`` for ``ssh -J`` when people reach this host over SSH; ``None`` for the local machine.
    ssh_jump: str | None = None

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        check: bool = True,
        stdin: bytes | None = None,
    ) -> CommandResult:
        """Run ``argv`` (no shell) and wait for it.

        :raise CommandNotFound: ``argv[0]`` does not exist on the host (exit 127).
        :raise CommandFailed: non-zero exit and ``check`` is true.
        :raise OperationTimeout: it ran longer than ``timeout``; it has been killed.
        :raise HostError: the host could not run it at all.
        """
        if not argv:
            raise ValueError("empty argv")
        returncode, out, err = await self._exec(argv, timeout=timeout, stdin=stdin)
        result = CommandResult(tuple(argv), returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if returncode == EXIT_NOT_FOUND and "not found" in result.stderr:
            raise CommandNotFound(argv[0], self.name)
        if check and returncode != 0:
            raise CommandFailed(argv, returncode, result.stderr)
        return result

    @abc.abstractmethod
    async def _exec(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None) -> tuple[int, bytes, bytes]:
        """Run ``argv`` and return its exit status, stdout and stderr, as they are.

        A missing command answers ``EXIT_NOT_FOUND`` with "not found" on stderr, as a shell does.

        :raise OperationTimeout: it ran longer than ``timeout``; it has been killed.
        :raise HostError: the host could not run it at all.
        """

    @abc.abstractmethod
    async def read_files(
        self, paths: Sequence[str], *, timeout: float, max_bytes: int = SMALL_FILE_MAX
    ) -> Mapping[str, bytes | None]:
        """Read several small regular files in one go.

        A missing or unreadable file, one that is not a regular file, a symbolic link (the last
        component), or one larger than ``max_bytes`` maps to ``None``; nothing larger is ever read.
        """

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

        :raise SocketUnavailable: nothing listens there.
        """

    @abc.abstractmethod
    async def open_tcp_socket(self, address: str, port: int, *, timeout: float) -> socket.socket:
        """A connected stream socket to ``address:port`` as seen from the host (a forwarded guest port).

        :raise SocketUnavailable: nothing accepts connections there.
        """

    @abc.abstractmethod
    async def read_range(self, path: str, *, offset: int | None, length: int, timeout: float) -> tuple[bytes, int]:
        """At most ``length`` bytes of a regular file from ``offset`` (``None``: its last ``length`` bytes), and
        the file's size now. A missing file reads as empty (size 0); an offset past the end gives no bytes.

        :raise HostError: it is not a regular file, or cannot be read.
        """

    async def realpath(self, paths: Sequence[str], *, timeout: float) -> list[str]:
        """Each path with every symbolic link and ``..`` resolved, as this host sees it (``realpath -m``:
        missing components are allowed)."""
        if not paths:
            return []
        result = await self.run(["realpath", "-m", "--", *paths], timeout=timeout)
        resolved = result.stdout.splitlines()
        if len(resolved) != len(paths):
            raise HostError(f"realpath on {self.name} answered {len(resolved)} lines for {len(paths)} paths")
        return resolved

    async def file_ids(self, paths: Sequence[str], *, timeout: float) -> dict[str, str | None]:
        """What each path *is* (``lstat``: a link is itself), or ``None`` when it does not exist:
        ``device:inode:birth-time:type``.

        A definition that names a path proves nothing about the file found there now; its recorded identity
        does. The birth time tells a new file that reused a freed inode number from the old one.
        """
        if not paths:
            return {}
        argv = ["stat", "--printf", "%d:%i:%.9W:%f\\t%n\\n", "--", *paths]
        result = await self.run(argv, timeout=timeout, check=False)
        found: dict[str, str | None] = dict.fromkeys(paths)
        for line in result.stdout.splitlines():
            fields, sep, path = line.partition("\t")
            device, _, rest = fields.partition(":")
            inode, _, rest = rest.partition(":")
            born, _, mode = rest.partition(":")
            if sep and path in found and mode:
                kind = _KIND.get(stat_mod.S_IFMT(int(mode, 16)), "other")
                found[path] = f"{device}:{inode}:{born}:{kind}"
        return found

    async def scan_subdirs(
        self, directory: str, filenames: Sequence[str], *, pidfile: str, timeout: float
    ) -> dict[str, SubdirFiles]:
        """Every subdirectory of ``directory`` (dot names skipped) with its small files ``filenames``, and the
        command line (``/proc/<pid>/cmdline``) of the process whose pid the file ``pidfile`` holds (a Unix pid
        file: which process it names is the host's to say, in the same read).

        This default composes the primitives (a few batched reads); remote hosts override it
        with a single round trip.
        """
        names = [n for n in await self.list_dir(directory, timeout=timeout) if not n.startswith(".")]
        wanted = list(dict.fromkeys([*filenames, pidfile]))
        stats = await asyncio.gather(*(self.stat(f"{directory}/{n}", timeout=timeout) for n in names))
        links = [n for n, st in zip(names, stats, strict=True) if st is not None and st.is_symlink]
        dirs = [n for n, st in zip(names, stats, strict=True) if st is not None and st.is_dir]
        paths = {(n, f): f"{directory}/{n}/{f}" for n in dirs for f in wanted}
        raws = await self.read_files(list(paths.values()), timeout=timeout) if paths else {}
        found: dict[str, dict[str, bytes | None]] = {n: {} for n in dirs}
        for (n, f), path in paths.items():
            found[n][f] = raws.get(path)
        # A file that exists but was not read is unreadable or too big: only the size tells which.
        missing = [(n, f) for (n, f), path in paths.items() if raws.get(path) is None]
        sizes = await asyncio.gather(*(self.stat(paths[key], timeout=timeout) for key in missing))
        oversized: dict[str, set[str]] = {}
        for (n, f), st in zip(missing, sizes, strict=True):
            if st is not None and st.is_file and st.size > SMALL_FILE_MAX:
                oversized.setdefault(n, set()).add(f)
        pids = {n: parse_pid(files.get(pidfile)) for n, files in found.items()}
        procs = {n: f"/proc/{pid}/cmdline" for n, pid in pids.items() if pid is not None}
        cmdlines = await self.read_files(list(procs.values()), timeout=timeout) if procs else {}
        scanned = {
            n: SubdirFiles(
                {f: files.get(f) for f in filenames},
                cmdlines.get(procs[n]) if n in procs else None,
                oversized=frozenset(oversized.get(n, ())),
            )
            for n, files in found.items()
        }
        scanned.update({n: SubdirFiles(dict.fromkeys(filenames), None, is_symlink=True) for n in links})
        return scanned

    @asynccontextmanager
    async def lock_file(self, path: str, *, timeout: float) -> AsyncIterator[FileLock]:
        """Hold an exclusive lock on ``path`` across processes of this host.

        Callers still serialize within the server; this guards against a second server process
        sharing the same ``vm_dir``. Hosts that cannot lock yield a lock whose ``held`` is false.
        A holder that calls :meth:`FileLock.discard` has the file removed as the lock is released
        (for names that turned out not to be VMs), which other waiters notice and handle.

        :raise OperationTimeout: another process held the lock for longer than ``timeout``.
        """
        yield FileLock(path, held=False)

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


@dataclass
class FileLock:
    """A held (or, on hosts that cannot lock, merely notional) lock file."""

    path: str
    held: bool
    #: Remove the lock file on release: nothing is left behind for a name that is not a VM.
    remove_on_release: bool = False

    def discard(self) -> None:
        self.remove_on_release = True


def parse_pid(raw: bytes | None) -> int | None:
    """The pid in a pid file's content, or ``None`` when there is none."""
    if raw is None:
        return None
    try:
        pid = int(raw.decode().strip())
    except ValueError:
        return None
    return pid if pid > 0 else None
