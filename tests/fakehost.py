"""A :class:`Host` in memory, for unit tests of the VM layer that run in milliseconds.

- files, directories and symbolic links live in dictionaries; ``stat``, ``realpath`` and the batched reads
  answer from them;
- every argv is recorded; the commands the VM layer runs (``mkdir``, ``rm``, ``rmdir``, ``ln``, ``cp``,
  ``kill``, ``qemu-img``, ``qemu-system-*``) are carried out on the fake files, and ``results`` scripts a
  failure for any of them;
- a started "QEMU" is a :class:`FakeVM`: its pid file, its ``/proc/<pid>/cmdline``, and a QMP peer on a
  ``socketpair`` that the real qemu.qmp client talks to (greeting, capabilities, ``query-status``,
  ``system_powerdown``, ``quit``, ``block_resize``), like qemu.qmp's own ``NullProtocol`` test double.

httpx's ``MockTransport`` is the model: the real code above it runs unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import posixpath
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qemu_mcp_http.errors import SocketUnavailable
from qemu_mcp_http.hosts.base import SMALL_FILE_MAX, FileStat, Host

Scripted = Callable[[Sequence[str]], "tuple[int, str, str] | None"]
_pids = itertools.count(4000)


@dataclass
class FakeImage:
    format: str
    size: int


@dataclass
class FakeVM:
    """A running fake QEMU: what its argv asked for, and how it answers the power button."""

    pid: int
    argv: list[str]
    acpi: Literal["obey", "ignore"] = "ignore"
    obeys_quit: bool = True
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    alive: bool = True

    @property
    def memory(self) -> str:
        return self.argv[self.argv.index("-m") + 1]


class FakeHost(Host):
    """See the module docstring. ``acpi`` and ``obeys_quit`` set how the next started VMs behave."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.identity = f"fake:{name}:{id(self)}"
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/"}
        self.links: dict[str, str] = {}
        self.inodes: dict[str, int] = {}
        self.images: dict[int, FakeImage] = {}
        self.argvs: list[list[str]] = []
        self.vms: dict[int, FakeVM] = {}
        self.sockets: dict[str, FakeVM] = {}
        self.scripted: list[Scripted] = []
        self.acpi: Literal["obey", "ignore"] = "ignore"
        self.obeys_quit = True
        self.max_memory_mib = 1 << 20
        self._inode = itertools.count(100)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- building the fake file system -------------------------------------------------------------

    def mkdirs(self, path: str) -> None:
        while path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def put(self, path: str, data: bytes = b"", image: FakeImage | None = None) -> None:
        self.mkdirs(posixpath.dirname(path))
        self.files[path] = data
        self.inodes[path] = next(self._inode)
        if image is not None:
            self.images[self.inodes[path]] = image

    def commands(self, name: str) -> list[list[str]]:
        return [argv for argv in self.argvs if argv[0] == name]

    def fail(self, predicate: Callable[[Sequence[str]], bool], stderr: str, returncode: int = 1) -> None:
        """Script: the next commands matching ``predicate`` fail with ``stderr``."""
        self.scripted.append(lambda argv: (returncode, "", stderr) if predicate(argv) else None)

    # -- Host: commands ----------------------------------------------------------------------------

    async def _exec(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None) -> tuple[int, bytes, bytes]:
        self.argvs.append(list(argv))
        for script in self.scripted:
            outcome = script(argv)
            if outcome is not None:
                code, out, err = outcome
                return code, out.encode(), err.encode()
        handler = getattr(self, "_cmd_" + argv[0].replace("-", "_"), None)
        if argv[0].startswith("qemu-system-"):
            handler = self._cmd_qemu_system
        if handler is None:
            return 127, b"", f"{argv[0]}: not found".encode()
        code, out, err = handler(list(argv[1:]))
        return code, out.encode(), err.encode()

    def _cmd_mkdir(self, args: list[str]) -> tuple[int, str, str]:
        parents = "-p" in args
        path = args[-1]
        if path in self.dirs or path in self.files:
            return (0, "", "") if parents and path in self.dirs else (1, "", "mkdir: File exists")
        if not parents and posixpath.dirname(path) not in self.dirs:
            return 1, "", "mkdir: No such file or directory"
        self.mkdirs(path)
        return 0, "", ""

    def _cmd_rm(self, args: list[str]) -> tuple[int, str, str]:
        for path in args[args.index("--") + 1 :]:
            if path in self.dirs:
                return 1, "", f"rm: cannot remove '{path}': Is a directory"
            self.files.pop(path, None)
            self.links.pop(path, None)
            self.inodes.pop(path, None)
        return 0, "", ""

    def _cmd_rmdir(self, args: list[str]) -> tuple[int, str, str]:
        path = args[-1]
        if any(posixpath.dirname(p) == path for p in [*self.files, *self.dirs, *self.links] if p != path):
            return 1, "", "rmdir: Directory not empty"
        self.dirs.discard(path)
        return 0, "", ""

    def _cmd_ln(self, args: list[str]) -> tuple[int, str, str]:
        source, target = args[-2], args[-1]
        if target in self.files or target in self.dirs:
            return 1, "", "ln: File exists"
        self.files[target] = self.files[source]
        self.inodes[target] = self.inodes[source]  # a hard link: the same file
        return 0, "", ""

    def _cmd_cp(self, args: list[str]) -> tuple[int, str, str]:
        source, target = args[-2], args[-1]
        self.put(target, self.files.get(source, b"firmware"))
        return 0, "", ""

    def _cmd_kill(self, args: list[str]) -> tuple[int, str, str]:
        vm = self.vms.get(int(args[-1]))
        if vm is None or not vm.alive:
            return 1, "", "kill: No such process"
        self._die(vm)
        return 0, "", ""

    def _cmd_qemu_img(self, args: list[str]) -> tuple[int, str, str]:
        verb, rest = args[0], [a for a in args[1:] if a not in ("-q", "-U")]
        fmt = rest[rest.index("-f") + 1] if "-f" in rest else None
        if verb == "create":
            path, size = rest[-2], int(rest[-1])
            self.put(path, b"image", FakeImage(fmt or "raw", size))
            return 0, "", ""
        path = rest[-1] if verb == "info" else rest[-2]
        image = self.images.get(self.inodes.get(path, -1))
        if image is None or (fmt is not None and fmt != image.format):
            return 1, "", f"qemu-img: Could not open '{path}': Image is not in {fmt} format"
        if verb == "info":
            return 0, json.dumps({"format": image.format, "virtual-size": image.size, "filename": path}), ""
        if verb == "resize":
            image.size = int(rest[-1])
            return 0, "", ""
        return 1, "", f"qemu-img: unknown command {verb}"

    def _cmd_qemu_system(self, args: list[str]) -> tuple[int, str, str]:
        memory = args[args.index("-m") + 1]
        if int(memory.rstrip("M")) > self.max_memory_mib:
            return 1, "", "qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory"
        vm = FakeVM(next(_pids), [f"qemu-system-{'x86_64' if '-machine' in args else 'aarch64'}", *args])
        vm.acpi, vm.obeys_quit = self.acpi, self.obeys_quit
        self.vms[vm.pid] = vm
        self.put(args[args.index("-pidfile") + 1], f"{vm.pid}\n".encode())
        qmp = args[args.index("-qmp") + 1]
        self.sockets[qmp.removeprefix("unix:").split(",")[0]] = vm
        return 0, "", ""

    def _die(self, vm: FakeVM) -> None:
        vm.alive = False
        for path in [p for p, owner in self.sockets.items() if owner is vm]:
            del self.sockets[path]

    # -- Host: files -------------------------------------------------------------------------------

    def _proc(self, path: str) -> bytes | None:
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "proc" and parts[3] == "cmdline" and parts[2].isdigit():
            vm = self.vms.get(int(parts[2]))
            return b"\0".join(a.encode() for a in vm.argv) + b"\0" if vm is not None and vm.alive else None
        return None

    async def read_files(
        self, paths: Sequence[str], *, timeout: float, max_bytes: int = SMALL_FILE_MAX
    ) -> Mapping[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for path in paths:
            data = self._proc(path) if path.startswith("/proc/") else self.files.get(path)
            out[path] = data if data is not None and len(data) <= max_bytes else None
        return out

    async def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        if posixpath.dirname(path) not in self.dirs:
            raise OSError(f"no directory for {path}")
        self.put(path, data)

    async def stat(self, path: str, *, timeout: float) -> FileStat | None:
        if path in self.links:
            return FileStat(size=0, is_dir=False, is_file=False, is_symlink=True)
        if path in self.dirs:
            return FileStat(size=4096, is_dir=True, is_file=False, is_symlink=False)
        if path in self.files:
            return FileStat(size=len(self.files[path]), is_dir=False, is_file=True, is_symlink=False)
        return None

    async def list_dir(self, path: str, *, timeout: float) -> list[str]:
        entries = {posixpath.basename(p) for p in [*self.files, *self.dirs, *self.links] if p != path}
        return sorted(n for n in entries if f"{path.rstrip('/')}/{n}" in {*self.files, *self.dirs, *self.links})

    async def realpath(self, paths: Sequence[str], *, timeout: float) -> list[str]:
        resolved = []
        for path in paths:
            path = posixpath.normpath(path)
            for _ in range(40):
                hit = next((link for link in self.links if path == link or path.startswith(link + "/")), None)
                if hit is None:
                    break
                path = posixpath.normpath(self.links[hit] + path[len(hit) :])
            resolved.append(path)
        return resolved

    async def file_ids(self, paths: Sequence[str], *, timeout: float) -> dict[str, str | None]:
        return {p: f"fake:{self.inodes[p]}:0:file" if p in self.inodes else None for p in paths}

    async def read_range(self, path: str, *, offset: int | None, length: int, timeout: float) -> tuple[bytes, int]:
        data = self.files.get(path, b"")
        start = max(0, len(data) - length) if offset is None else offset
        return data[start : start + length], len(data)

    # -- Host: sockets (a QMP peer per running fake VM) ---------------------------------------------

    async def open_tcp_socket(self, address: str, port: int, *, timeout: float) -> socket.socket:
        raise SocketUnavailable(f"{address}:{port}", self.name, "Connection refused")

    async def open_unix_socket(self, path: str, *, timeout: float) -> socket.socket:
        vm = self.sockets.get(path)
        if vm is None or not vm.alive:
            raise SocketUnavailable(path, self.name, "Connection refused")
        ours, theirs = socket.socketpair()
        task = asyncio.get_running_loop().create_task(self._serve_qmp(vm, theirs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        ours.setblocking(False)
        return ours

    async def _serve_qmp(self, vm: FakeVM, sock: socket.socket) -> None:
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        greeting = {
            "QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}
        }
        decoder = json.JSONDecoder()
        buffer = ""
        try:
            writer.write(json.dumps(greeting).encode() + b"\r\n")
            while vm.alive:
                # qemu.qmp sends one JSON object after another, without newlines: decode them as they come.
                try:
                    message, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    buffer += chunk.decode()
                    continue
                buffer = buffer.lstrip()[end:]
                command, arguments = message["execute"], message.get("arguments", {})
                vm.commands.append((command, arguments))
                answer: Any = {"status": "running", "running": True} if command == "query-status" else {}
                writer.write(json.dumps({"return": answer, "id": message.get("id")}).encode() + b"\r\n")
                await writer.drain()
                if (command == "system_powerdown" and vm.acpi == "obey") or (command == "quit" and vm.obeys_quit):
                    self._die(vm)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
