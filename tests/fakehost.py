"""A :class:`Host` in memory, for unit tests of the VM layer that run in milliseconds.

- files, directories and symbolic links live in dictionaries; ``stat``, ``realpath`` and the batched reads
  answer from them;
- every argv is recorded; the commands the VM layer runs (``mkdir``, ``rm``, ``rmdir``, ``ln``, ``cp``,
  ``kill``, ``qemu-img``, ``qemu-system-*``) are carried out on the fake files, and ``results`` scripts a
  failure for any of them;
- a started "QEMU" is a :class:`FakeVM`: its pid file, its ``/proc/<pid>/cmdline``, and a QMP peer on a
  ``socketpair`` that the real qemu.qmp client talks to (greeting, capabilities, ``query-status``,
  ``system_powerdown``, ``quit``, ``block_resize``, ``screendump``, the snapshot jobs, and whatever
  ``FakeVM.answers`` scripts), like qemu.qmp's own ``NullProtocol`` test double;
- its guest agent is a :class:`FakeAgent` on the VM's ``qga.sock`` (line-delimited JSON: sync, exec, files,
  info; a VM whose ``agent`` is ``None`` has a channel nobody answers), and its serial console socket records
  what is written to it;
- ``qemu-img`` knows formats, sizes, backing files and internal snapshots (:class:`FakeImage`).

httpx's ``MockTransport`` is the model: the real code above it runs unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import posixpath
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from qemu_mcp_http.config import Settings
from qemu_mcp_http.errors import SocketUnavailable
from qemu_mcp_http.hosts.base import SMALL_FILE_MAX, FileStat, Host
from qemu_mcp_http.vm.fence import Fence, FenceRules
from qemu_mcp_http.vm.manager import VMManager
from qemu_mcp_http.vm.qmp import QMPPool
from qemu_mcp_http.vm.shared import SharedState
from qemu_mcp_http.vm.vmdir import VMDir

Scripted = Callable[[Sequence[str]], "tuple[int, str, str] | None"]
VM_DIR = "/vms"
#: Short waits: a fake VM that ignores the power button costs this much of a test, not 30 s.
QUICK = 0.2
_pids = itertools.count(4000)


@dataclass
class FakeImage:
    format: str
    size: int
    backing: str | None = None
    backing_format: str | None = None
    #: Internal snapshots, as ``qemu-img info`` lists them.
    snapshots: list[dict[str, Any]] = field(default_factory=list)

    def info(self, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "virtual-size": self.size, "filename": path}
        if self.backing is not None:
            out["backing-filename"] = self.backing
            if self.backing_format is not None:
                out["backing-filename-format"] = self.backing_format
        if self.snapshots:
            out["snapshots"] = self.snapshots
        return out

    def snapshot(self, tag: str, vm_state_size: int = 0) -> None:
        self.snapshots.append(
            {"id": str(len(self.snapshots) + 1), "name": tag, "vm-state-size": vm_state_size, "date-sec": 1700000000,
             "date-nsec": 0, "vm-clock-sec": 12, "vm-clock-nsec": 500000000}
        )  # fmt: skip


def tiny_png(width: int = 4, height: int = 3) -> bytes:
    """A valid RGB PNG of one colour (what ``screendump`` writes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\0" + b"\x20\x40\x60" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class QMPRefusal(Exception):
    """A scripted QMP error answer (``{"error": {"class": "GenericError", "desc": ...}}``)."""


@dataclass
class FakeAgent:
    """A guest agent: ``run`` plays a command (``argv, stdin -> exit code, stdout, stderr``); ``files`` is the
    guest's file system; ``disabled`` commands answer as qemu-ga's ``--block-rpcs`` makes them answer."""

    run: Callable[[list[str], bytes], tuple[int, bytes, bytes]] = lambda argv, stdin: (0, " ".join(argv).encode(), b"")
    files: dict[str, bytes] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)
    facts: dict[str, Any] = field(default_factory=dict)
    #: guest-exec-status answers "not exited" this many times first.
    polls_before_exit: int = 0
    commands: list[str] = field(default_factory=list)
    _processes: dict[int, dict[str, Any]] = field(default_factory=dict)
    _handles: dict[int, tuple[str, bytearray, int]] = field(default_factory=dict)

    def answer(self, command: str, arguments: dict[str, Any]) -> Any:
        """The ``return`` value; :raise QMPRefusal: an error answer."""
        self.commands.append(command)
        if command in self.disabled:
            raise QMPRefusal(f"Command {command} has been disabled")
        if command in self.facts:
            return self.facts[command]
        handler = getattr(self, "_" + command.replace("-", "_"), None)
        if handler is None:
            raise QMPRefusal(f"The command {command} has not been found")
        return handler(arguments)

    def _guest_sync(self, arguments: dict[str, Any]) -> Any:
        return arguments["id"]

    def _guest_ping(self, arguments: dict[str, Any]) -> Any:
        return {}

    def _guest_info(self, arguments: dict[str, Any]) -> Any:
        names = ["guest-exec", "guest-exec-status", "guest-file-open", "guest-ping"]
        commands = [{"name": n, "enabled": n not in self.disabled} for n in names]
        return {"version": "7.2.0", "supported_commands": commands}

    def _guest_exec(self, arguments: dict[str, Any]) -> Any:
        stdin = base64.b64decode(arguments.get("input-data", ""))
        code, out, err = self.run([arguments["path"], *arguments.get("arg", [])], stdin)
        pid = 700 + len(self._processes)
        self._processes[pid] = {"exitcode": code, "out": out, "err": err, "polls": self.polls_before_exit}
        return {"pid": pid}

    def _guest_exec_status(self, arguments: dict[str, Any]) -> Any:
        process = self._processes[arguments["pid"]]
        if process["polls"] > 0:
            process["polls"] -= 1
            return {"exited": False}
        return {
            "exited": True,
            "exitcode": process["exitcode"],
            "out-data": base64.b64encode(process["out"]).decode(),
            "err-data": base64.b64encode(process["err"]).decode(),
        }

    def _guest_file_open(self, arguments: dict[str, Any]) -> Any:
        path, mode = arguments["path"], arguments.get("mode", "r")
        if mode == "r" and path not in self.files:
            raise QMPRefusal(f"failed to open file '{path}' (mode: 'r'): No such file or directory")
        data = bytearray(b"" if mode == "w" else self.files.get(path, b""))
        handle = 1000 + len(self._handles)
        self._handles[handle] = (path, data, 0)
        return handle

    def _guest_file_read(self, arguments: dict[str, Any]) -> Any:
        path, data, at = self._handles[arguments["handle"]]
        piece = bytes(data[at : at + arguments["count"]])
        self._handles[arguments["handle"]] = (path, data, at + len(piece))
        eof = at + len(piece) >= len(data)
        return {"count": len(piece), "buf-b64": base64.b64encode(piece).decode(), "eof": eof}

    def _guest_file_write(self, arguments: dict[str, Any]) -> Any:
        data = self._handles[arguments["handle"]][1]
        piece = base64.b64decode(arguments["buf-b64"])
        data += piece
        return {"count": len(piece), "eof": False}

    def _guest_file_close(self, arguments: dict[str, Any]) -> Any:
        path, data, _ = self._handles.pop(arguments["handle"])
        self.files[path] = bytes(data)
        return {}


@dataclass
class FakeVM:
    """A running fake QEMU: what its argv asked for, and how it answers the power button."""

    pid: int
    argv: list[str]
    acpi: Literal["obey", "ignore"] = "ignore"
    obeys_quit: bool = True
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    alive: bool = True
    #: QMP answers by command: a value, or a function of the arguments (raising QMPRefusal for an error).
    answers: dict[str, Any] = field(default_factory=dict)
    agent: FakeAgent | None = None
    #: What was written to the serial console socket.
    console_input: bytearray = field(default_factory=bytearray)
    #: QMP jobs (snapshot-save, ...), as query-jobs shows them.
    jobs: list[dict[str, Any]] = field(default_factory=list)

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
        self.sockets: dict[str, tuple[FakeVM, str]] = {}
        #: The agent of the next started VM (``None``: a guest without one).
        self.agent: FakeAgent | None = None
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

    def _cmd_getconf(self, args: list[str]) -> tuple[int, str, str]:
        return (0, "100\n", "") if args == ["CLK_TCK"] else (1, "", f"getconf: Unrecognized variable '{args[0]}'")

    def _cmd_nproc(self, args: list[str]) -> tuple[int, str, str]:
        return 0, "2\n", ""

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
            backing = rest[rest.index("-b") + 1] if "-b" in rest else None
            backing_format = rest[rest.index("-F") + 1] if "-F" in rest else None
            self.put(path, b"image", FakeImage(fmt or "raw", size, backing, backing_format))
            return 0, "", ""
        if verb == "snapshot":
            return self._qemu_img_snapshot(rest)
        path = rest[-1] if verb == "info" else rest[-2]
        image = self.images.get(self.inodes.get(path, -1))
        if image is None or (fmt is not None and fmt != image.format):
            return 1, "", f"qemu-img: Could not open '{path}': Image is not in {fmt} format"
        if verb == "info":
            return 0, json.dumps(image.info(path)), ""
        if verb == "resize":
            image.size = int(rest[-1])
            return 0, "", ""
        return 1, "", f"qemu-img: unknown command {verb}"

    def _qemu_img_snapshot(self, rest: list[str]) -> tuple[int, str, str]:
        flag, tag, options = rest[0], rest[1], rest[rest.index("--image-opts") + 1]
        path = dict(o.split("=", 1) for o in options.split(","))["file.filename"]
        image = self.images.get(self.inodes.get(path, -1))
        if image is None:
            return 1, "", f"qemu-img: Could not open '{path}'"
        found = [s for s in image.snapshots if s["name"] == tag]
        if flag == "-c":
            image.snapshot(tag)
        elif not found:
            return 1, "", f"qemu-img: Could not {'apply' if flag == '-a' else 'delete'} snapshot '{tag}'"
        elif flag == "-d":
            image.snapshots.remove(found[0])
        return 0, "", ""

    def _cmd_qemu_system(self, args: list[str]) -> tuple[int, str, str]:
        memory = args[args.index("-m") + 1]
        if int(memory.rstrip("M")) > self.max_memory_mib:
            return 1, "", "qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory"
        vm = FakeVM(next(_pids), [f"qemu-system-{'x86_64' if '-machine' in args else 'aarch64'}", *args])
        vm.acpi, vm.obeys_quit = self.acpi, self.obeys_quit
        self.vms[vm.pid] = vm
        self.put(args[args.index("-pidfile") + 1], f"{vm.pid}\n".encode())
        vm.agent = self.agent
        qmp = args[args.index("-qmp") + 1]
        self.sockets[qmp.removeprefix("unix:").split(",")[0]] = (vm, "qmp")
        for value in args:
            options = dict(o.split("=", 1) for o in value.split(",")[1:] if "=" in o)
            if value.startswith("socket,id=qga0,"):
                self.sockets[options["path"]] = (vm, "qga")
            elif value.startswith("socket,id=serial0,"):
                self.sockets[options["path"]] = (vm, "console")
        return 0, "", ""

    def _die(self, vm: FakeVM) -> None:
        vm.alive = False
        for path in [p for p, (owner, _) in self.sockets.items() if owner is vm]:
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
            data = self._proc(path) if path.startswith("/proc/") else None
            data = self.files.get(path) if data is None else data
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
        vm, kind = self.sockets.get(path, (None, ""))
        if vm is None or not vm.alive:
            raise SocketUnavailable(path, self.name, "Connection refused")
        ours, theirs = socket.socketpair()
        serve = {"qmp": self._serve_qmp, "qga": self._serve_agent, "console": self._serve_console}[kind]
        task = asyncio.get_running_loop().create_task(serve(vm, theirs))
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
                try:
                    reply: dict[str, Any] = {"return": self._qmp_answer(vm, command, arguments)}
                except QMPRefusal as exc:
                    reply = {"error": {"class": "GenericError", "desc": str(exc)}}
                writer.write(json.dumps({**reply, "id": message.get("id")}).encode() + b"\r\n")
                await writer.drain()
                if (command == "system_powerdown" and vm.acpi == "obey") or (command == "quit" and vm.obeys_quit):
                    self._die(vm)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _qmp_answer(self, vm: FakeVM, command: str, arguments: dict[str, Any]) -> Any:
        if command in vm.answers:
            scripted = vm.answers[command]
            return scripted(arguments) if callable(scripted) else scripted
        if command == "query-status":
            return {"status": "running", "running": True}
        if command == "screendump":
            self.put(arguments["filename"], tiny_png())
        elif command == "query-block":
            return [{"device": "", "inserted": {"node-name": "disk0-fmt", "image": self._disk_of(vm).info("disk")}}]
        elif command in ("snapshot-save", "snapshot-load", "snapshot-delete"):
            self._snapshot_job(vm, command, arguments)
        elif command == "blockdev-snapshot-internal-sync":
            self._disk_of(vm).snapshot(arguments["name"])
        elif command == "query-jobs":
            return vm.jobs
        elif command == "job-dismiss":
            vm.jobs[:] = [j for j in vm.jobs if j["id"] != arguments["id"]]
        return {}

    def _disk_of(self, vm: FakeVM) -> FakeImage:
        drive = next(a for a in vm.argv if a.startswith("file=") and "id=disk0" in a)
        path = drive.split(",")[0].removeprefix("file=")
        return self.images[self.inodes[path]]

    def _snapshot_job(self, vm: FakeVM, command: str, arguments: dict[str, Any]) -> None:
        image, tag = self._disk_of(vm), arguments["tag"]
        found = [s for s in image.snapshots if s["name"] == tag]
        error = None
        if command == "snapshot-save":
            image.snapshot(tag, vm_state_size=64 << 20)
        elif not found:
            error = f"Snapshot '{tag}' does not exist"
        elif command == "snapshot-delete":
            image.snapshots.remove(found[0])
        job = {"id": arguments["job-id"], "status": "concluded", "current-progress": 1, "total-progress": 1}
        vm.jobs.append({**job, "error": error} if error else job)

    async def _serve_agent(self, vm: FakeVM, sock: socket.socket) -> None:
        """Line-delimited JSON; a VM without an agent has a channel that nobody answers."""
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            while vm.alive:
                line = await reader.readline()
                if not line:
                    break
                if vm.agent is None:
                    continue
                message = json.loads(line)
                command = message["execute"]
                if command == "guest-shutdown":
                    self._die(vm)
                    break
                try:
                    reply: dict[str, Any] = {"return": vm.agent.answer(command, message.get("arguments", {}))}
                except QMPRefusal as exc:
                    reply = {"error": {"class": "GenericError", "desc": str(exc)}}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve_console(self, vm: FakeVM, sock: socket.socket) -> None:
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            while data := await reader.read(65536):
                vm.console_input += data
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def running(self) -> FakeVM:
        """The one fake VM that runs."""
        (vm,) = [vm for vm in self.vms.values() if vm.alive]
        return vm

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


# -- fixtures (registered in conftest.py) ------------------------------------------------------------


@pytest.fixture
async def fake_host() -> AsyncIterator[FakeHost]:
    """A FakeHost with a vm_dir (/vms), a /data directory and the arm64 UEFI variables template."""
    fake = FakeHost()
    fake.mkdirs(VM_DIR)
    fake.mkdirs("/data")
    fake.put("/usr/share/AAVMF/AAVMF_VARS.fd", b"vars")
    try:
        yield fake
    finally:
        await fake.aclose()


@pytest.fixture
async def fake_vms(fake_host: FakeHost) -> AsyncIterator[VMManager]:
    """The VMManager of /vms on ``fake_host``: TCG, everything under / allowed, short timeouts."""
    settings = Settings(vm_dir=VM_DIR, accel="tcg", allowed_roots=("/",), qmp_timeout=1.0)
    shared = SharedState(qmp=QMPPool(idle_timeout=0.05))
    fence = Fence(fake_host, FenceRules(roots=("/",)), settings.command_timeout)
    manager = VMManager(VMDir(fake_host, VM_DIR, settings, shared, fence))
    manager.power.quit_wait = QUICK
    try:
        yield manager
    finally:
        await shared.aclose()
