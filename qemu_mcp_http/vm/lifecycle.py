"""VM operations on any host: create, start, stop, delete, modify, status.

These functions know a :class:`Host`, never whether it is local or remote.

Nothing a VM's files say is trusted for a path: every disk and ISO a definition names is checked again
(see :mod:`.fence` and :mod:`.disks`) before QEMU opens it, and delete removes only the files the server
manages plus a disk create made, while it is still the very file create made (its recorded identity).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import posixpath
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import Settings
from ..errors import (
    InvalidInput,
    OperationTimeout,
    QemuError,
    QemuMcpError,
    QMPFailure,
    QMPUnavailable,
    VMExists,
    VMNotFound,
    VMStateError,
)
from ..hosts.base import FileLock, Host
from ..qmp import QMPPool, QMPSession
from ..security import StreamLimiter
from ..shutdown import ShutdownSignal
from .accel import AccelProbe
from .argv import ARM64_FIRMWARE, qemu_argv
from .disks import DiskImages, temp_name
from .fence import Fence
from .paths import MANAGED_NAMES, UNIX_PATH_MAX, VMPaths
from .spec import (
    GIB,
    DiskDefinition,
    VMDefinition,
    disk_format_for,
    format_size,
    parse_arch,
    parse_disk,
    parse_memory_mib,
    validate_name,
    validate_path,
    validate_vcpus,
)
from .store import ProcessFacts, VMStore, process_matches

__all__ = ["SharedState", "VMManager", "VMState"]

log = logging.getLogger(__name__)

DEFAULT_DISK_BYTES = 20 * GIB
StopMethod = Literal["acpi", "quit", "sigkill", "already-stopped"]
#: Temporary files of the atomic writes of managed files (``.vm.json.<pid>.tmp`` and the like).
_MANAGED_TEMP = re.compile(r"\.(vm\.json|runtime\.json|\.create\.json)\.[A-Za-z0-9]+\.tmp")


@dataclass
class SharedState:
    """State shared by every call of one server: per-VM locks, the accelerator probe cache, monitor streams."""

    accel_probe: AccelProbe = field(default_factory=AccelProbe)
    monitor_streams: StreamLimiter = field(default_factory=StreamLimiter)
    qmp: QMPPool = field(default_factory=QMPPool)
    shutdown: ShutdownSignal = field(default_factory=ShutdownSignal)
    #: Facts of a host that do not change while the server runs (clock tick, CPU count), by host identity.
    host_facts: dict[tuple[str, str], object] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Close the shared QMP connections (the VMs keep running)."""
        await self.qmp.aclose()

    _locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)

    @asynccontextmanager
    async def vm_lock(self, host: str, vm_dir: str, name: str, timeout: float) -> AsyncIterator[None]:
        """The in-process lock of one VM.

        :raise OperationTimeout: another call held it for longer than ``timeout``.
        """
        key = (host, vm_dir, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            try:
                async with asyncio.timeout(timeout):
                    await lock.acquire()
            except TimeoutError:
                raise OperationTimeout(
                    f"another operation on VM {name} held its lock for more than {timeout:g} s; retry later"
                ) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            if not lock.locked() and not lock._waiters:
                self._locks.pop(key, None)


@dataclass(frozen=True)
class VMState:
    """A VM's status as clients see it, from the pid (checked against /proc) and QMP together."""

    status: Literal["running", "stopped"]
    pid: int | None = None
    run_state: str | None = None  # QMP's own word: running, paused, shutdown, ... or unresponsive
    accel: str | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.status == "running":
            out.update(pid=self.pid, run_state=self.run_state, accel=self.accel)
        return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _random_mac() -> str:
    # 52:54:00 is QEMU's locally administered prefix, as libvirt uses.
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


class VMManager:
    """Operations on the VMs of one ``vm_dir`` of one host."""

    def __init__(self, host: Host, vm_dir: str, settings: Settings, shared: SharedState, fence: Fence) -> None:
        self.host = host
        self.vm_dir = validate_path(vm_dir, "vm_dir")
        self.settings = settings
        self.shared = shared
        self.fence = fence
        self.store = VMStore(host, self.vm_dir, settings.command_timeout)
        self.disks = DiskImages(host, fence, settings.command_timeout)

    # -- helpers ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[FileLock]:
        # In-process first (cheap, fair), then the lock file that another server process sharing
        # this vm_dir also takes. The lock files live apart from the VM directory, which delete removes;
        # an operation that finds no VM discards its lock file, so unknown names leave nothing behind.
        async with (
            self.shared.vm_lock(self.host.identity, self.vm_dir, name, self.settings.lock_timeout),
            self.host.lock_file(self.store.paths(name).lock_file, timeout=self.settings.lock_timeout) as lock,
        ):
            yield lock

    async def _load_locked(self, name: str, lock: FileLock) -> VMDefinition:
        try:
            return await self.store.load(name)
        except VMNotFound:
            lock.discard()
            raise

    async def _run(self, *argv: str, check: bool = True, timeout: float | None = None) -> Any:
        return await self.host.run(argv, timeout=timeout or self.settings.command_timeout, check=check)

    def _qmp(self, name: str) -> AbstractAsyncContextManager[QMPSession]:
        """The shared QMP connection of VM ``name``."""
        return self.shared.qmp.session(self.host, self.store.paths(name).qmp_socket, name, self.settings.qmp_timeout)

    async def state_of(self, definition: VMDefinition, facts: ProcessFacts | None = None) -> VMState:
        if facts is None:
            facts = (await self.store.process_facts([definition.name]))[definition.name]
        if not facts.alive:
            return VMState("stopped")
        try:
            async with self._qmp(definition.name) as qmp:
                status = await qmp.execute("query-status")
            run_state = str(status.get("status", "unknown"))
        except (QMPUnavailable, OperationTimeout, QMPFailure):
            run_state = "unresponsive"
        accel = facts.runtime.get("accel")
        return VMState("running", pid=facts.pid, run_state=run_state, accel=str(accel) if accel else None)

    async def _wait_gone(self, paths: VMPaths, pid: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        proc = f"/proc/{pid}/cmdline"
        while True:
            cmdline = (await self.host.read_files([proc], timeout=self.settings.command_timeout))[proc]
            if not process_matches(cmdline, paths):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _clean_runtime_files(self, paths: VMPaths) -> None:
        await self.shared.qmp.forget(self.host, paths.qmp_socket)
        await self._run("rm", "-f", "--", paths.qmp_socket, paths.qga_socket, paths.pidfile, paths.runtime)

    async def _verify_media(self, definition: VMDefinition) -> None:
        """Check the disk and ISO a definition names, as on create: the files may have changed since.

        :raise InvalidInput: a path breaks the fence, or the disk's chain is not safe to open.
        """
        paths = self.store.paths(definition.name)
        disk = definition.disk
        await self.fence.check("disk", disk.path, own_dir=paths.directory)
        await self.disks.inspect(disk.path, disk.format, own_dir=paths.directory)
        if definition.iso is not None:
            await self._check_iso(definition.iso)

    async def _check_iso(self, iso: str) -> None:
        real = await self.fence.check("iso", iso)
        st = await self.host.stat(real, timeout=self.settings.command_timeout)
        if st is None or not st.is_file:
            raise InvalidInput("iso", f"{iso} does not exist on {self.host.name} or is not a regular file")

    # -- create ----------------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        arch: str | None,
        memory: str | None,
        vcpus: int | None,
        disk: str | None,
        iso: str | None,
    ) -> dict[str, Any]:
        """Validate everything, make the disk, record the definition. Does not start the VM.

        On any failure nothing is left behind: what the call made is removed, and only that.
        A create cut short by a crash leaves a journal that lets delete remove what it made.
        """
        s = self.settings
        name = validate_name(name)
        arch_ = parse_arch(arch)
        memory_mib = parse_memory_mib(memory if memory is not None else "2G", s.max_memory_mib)
        vcpus_ = validate_vcpus(vcpus if vcpus is not None else 2, s.max_vcpus)
        disk_spec = parse_disk(disk, s.max_disk_gib * GIB)
        iso_path = validate_path(iso, "iso") if iso else None
        paths = self.store.paths(name)
        if len(paths.qmp_socket.encode()) > UNIX_PATH_MAX:
            raise InvalidInput(
                "vm_dir",
                f"{self.vm_dir!r} is too deep: the QMP socket path would exceed {UNIX_PATH_MAX} bytes",
            )
        disk_path = disk_spec.path or paths.default_disk()
        disk_format = disk_format_for(disk_path, disk_spec.format)
        await self.fence.check("vm_dir", self.vm_dir)
        if disk_spec.path is not None:
            await self.fence.check("disk", disk_path, own_dir=paths.directory)
        if iso_path is not None:
            await self._check_iso(iso_path)

        async with self._lock(name) as lock:
            await self._run("mkdir", "-p", "--", self.vm_dir)
            claimed = await self._run("mkdir", "--", paths.directory, check=False)
            if not claimed.succeeded:
                if await self.host.stat(paths.definition, timeout=s.command_timeout) is not None:
                    raise VMExists(f"VM {name} already exists on {self.host.name}; delete it first or use another name")
                raise VMExists(
                    f"{paths.directory} already exists on {self.host.name} but holds no VM definition "
                    "(a create cut short? delete removes what it made); remove it or use another name"
                )
            journal: dict[str, Any] = {"started_at": _now()}
            try:
                await self._write_journal(paths, journal)
                existing = await self.host.stat(disk_path, timeout=s.command_timeout)
                if existing is not None:
                    disk_def = await self._attach_existing_disk(
                        paths, disk_path, disk_spec.format, disk_spec.size_bytes
                    )
                else:
                    parent = posixpath.dirname(disk_path) or "/"
                    if await self.host.stat(parent, timeout=s.command_timeout) is None:
                        raise InvalidInput("disk", f"directory {parent} does not exist on {self.host.name}")
                    size = disk_spec.size_bytes or DEFAULT_DISK_BYTES
                    journal.update(disk=disk_path, tmp=temp_name(disk_path))
                    await self._write_journal(paths, journal)
                    identity = await self.disks.create(disk_path, disk_format, size, tmp=journal["tmp"])
                    journal["identity"] = identity
                    await self._write_journal(paths, journal)
                    disk_def = DiskDefinition(disk_path, disk_format, size, created_by_tool=True, identity=identity)
                if arch_ == "arm64":
                    await self._prepare_efi_vars(paths)
                definition = VMDefinition(
                    name=name,
                    arch=arch_,
                    memory_mib=memory_mib,
                    vcpus=vcpus_,
                    disk=disk_def,
                    iso=iso_path,
                    uuid=str(uuid.uuid4()),
                    mac=_random_mac(),
                    created_at=_now(),
                    machine="q35" if arch_ == "x86_64" else "virt",
                )
                await self.store.save(definition)
                await self._run("rm", "-f", "--", paths.journal)
            except BaseException:
                lock.discard()
                await asyncio.shield(self._undo_create(paths, journal))
                raise
        details = {"vm_dir": self.vm_dir, "directory": paths.directory, **definition.summary()}
        if not disk_def.created_by_tool:
            details["disk_attached"] = "existing disk attached; delete will keep it"
        return details

    async def _write_journal(self, paths: VMPaths, journal: dict[str, Any]) -> None:
        data = json.dumps(journal, sort_keys=True).encode() + b"\n"
        await self.host.write_file(paths.journal, data, timeout=self.settings.command_timeout)

    async def _attach_existing_disk(
        self, paths: VMPaths, path: str, fmt: str | None, size: int | None
    ) -> DiskDefinition:
        st = await self.host.stat(path, timeout=self.settings.command_timeout)
        if st is None or not st.is_file:
            raise InvalidInput("disk", f"{path} exists on {self.host.name} but is not a regular file")
        top = (await self.disks.inspect(path, fmt, own_dir=paths.directory))[0]
        if size is not None and size != top.virtual_size:
            raise InvalidInput(
                "disk",
                f"{path} exists with size {format_size(top.virtual_size)}; omit size to attach it as it is, "
                "or grow it later with modify",
            )
        return DiskDefinition(path, top.format, top.virtual_size, created_by_tool=False)

    async def _prepare_efi_vars(self, paths: VMPaths) -> None:
        template = ARM64_FIRMWARE.vars_template
        if await self.host.stat(template, timeout=self.settings.command_timeout) is None:
            raise QemuError(f"UEFI firmware {template} is missing on {self.host.name}; install qemu-efi-aarch64 there")
        await self._run("cp", "--", template, paths.efi_vars)

    async def _undo_create(self, paths: VMPaths, journal: dict[str, Any]) -> None:
        try:
            await self._remove_made(paths, journal)
        except QemuMcpError:
            log.exception("could not undo the partial create of %s on %s", paths.name, self.host.name)

    # -- start -----------------------------------------------------------------------------------

    async def start(self, name: str) -> tuple[str, dict[str, Any]]:
        """Start the VM daemonized; return once QMP says running."""
        name = validate_name(name)
        async with self._lock(name) as lock:
            definition = await self._load_locked(name, lock)
            return await self._start_locked(definition)

    async def _start_locked(self, definition: VMDefinition) -> tuple[str, dict[str, Any]]:
        name = definition.name
        paths = self.store.paths(name)
        state = await self.state_of(definition)
        if state.status == "running":
            return f"VM {name} is already running", state.summary()
        await self._verify_media(definition)
        await self._clean_runtime_files(paths)
        accel = await self._choose_accel(definition)
        argv = qemu_argv(definition, paths, accel)
        loop = asyncio.get_running_loop()
        began = loop.time()
        result = await self.host.run(argv, timeout=self.settings.start_timeout, check=False)
        if not result.succeeded:
            message = result.stderr.strip() or f"exit status {result.returncode}"
            raise QemuError(f"QEMU failed to start VM {name}: {message}")
        run_state = await self._wait_running(definition, paths, began + self.settings.start_timeout)
        facts = (await self.store.process_facts([name]))[name]
        await self.store.save_runtime(name, {"accel": accel, "pid": facts.pid, "started_at": _now(), "argv": argv})
        details = {
            "status": "running",
            "run_state": run_state,
            "pid": facts.pid,
            "accel": accel,
            "qmp_socket": paths.qmp_socket,
            "console_log": paths.console_log,
            "start_seconds": round(loop.time() - began, 3),
        }
        return f"VM {name} started on {self.host.name} ({accel})", details

    async def _choose_accel(self, definition: VMDefinition) -> str:
        if self.settings.accel != "auto":
            return self.settings.accel
        choice = await self.shared.accel_probe.choose(
            self.host,
            definition.arch,
            self.settings,
            self.store.paths(definition.name).directory,
        )
        return choice.accel

    async def _wait_running(self, definition: VMDefinition, paths: VMPaths, deadline: float) -> str:
        loop = asyncio.get_running_loop()
        last: QemuMcpError | None = None
        while loop.time() < deadline:
            try:
                async with self._qmp(definition.name) as q:
                    status = await q.execute("query-status")
                    if status.get("status") == "running":
                        return "running"
                    last = VMStateError(f"QEMU reports {status.get('status')}")
            except (QMPUnavailable, OperationTimeout) as exc:
                last = exc
            await asyncio.sleep(0.05)
        raise QemuError(
            f"VM {definition.name} did not reach 'running' within {self.settings.start_timeout:g} s: {last}"
        )

    # -- stop ------------------------------------------------------------------------------------

    def check_stop_timeout(self, timeout: float) -> float:
        """:raise InvalidInput: not a finite number of seconds within 0 .. the server's maximum."""
        limit = self.settings.max_stop_timeout
        if not math.isfinite(timeout) or not 0 <= timeout <= limit:
            raise InvalidInput("stop_timeout", f"{timeout!r} must be a number of seconds from 0 to {limit:g}")
        return timeout

    async def stop(self, name: str, timeout: float) -> tuple[str, dict[str, Any]]:
        """ACPI power-down, then QMP ``quit`` after ``timeout``, then SIGKILL as the last resort."""
        name = validate_name(name)
        timeout = self.check_stop_timeout(timeout)
        async with self._lock(name) as lock:
            definition = await self._load_locked(name, lock)
            method, seconds = await self._stop_locked(definition.name, timeout)
        if method == "already-stopped":
            return f"VM {name} is already stopped", {"status": "stopped", "stopped_by": method}
        how = {"acpi": "ACPI shutdown", "quit": "QMP quit", "sigkill": "SIGKILL"}[method]
        return f"VM {name} stopped ({how})", {"status": "stopped", "stopped_by": method, "stop_seconds": seconds}

    async def _stop_locked(self, name: str, timeout: float) -> tuple[StopMethod, float]:
        paths = self.store.paths(name)
        facts = (await self.store.process_facts([name]))[name]
        if not facts.alive or facts.pid is None:
            await self._clean_runtime_files(paths)
            return "already-stopped", 0.0
        pid = facts.pid
        loop = asyncio.get_running_loop()
        began = loop.time()
        method: StopMethod | None = None
        for step, wait in (("acpi", timeout), ("quit", 5.0)):
            command = "system_powerdown" if step == "acpi" else "quit"
            try:
                async with self._qmp(name) as q:
                    await q.execute(command)
            except (QMPUnavailable, OperationTimeout, QMPFailure) as exc:
                log.info("QMP %s of %s failed: %s", command, name, exc)
            if await self._wait_gone(paths, pid, wait):
                method = step  # type: ignore[assignment]
                break
        if method is None:
            await self._run("kill", "-KILL", str(pid), check=False)
            if not await self._wait_gone(paths, pid, 5.0):
                raise VMStateError(f"VM {name} (pid {pid}) survived SIGKILL")
            method = "sigkill"
        await self._clean_runtime_files(paths)
        return method, round(loop.time() - began, 3)

    # -- delete ----------------------------------------------------------------------------------

    async def delete(self, name: str, timeout: float) -> dict[str, Any]:
        """Stop if running; remove the files the server manages and a disk create made, nothing else.

        A directory that still holds other files is kept (and named in ``kept``). A VM directory that is a
        symbolic link is removed as a link, never followed. An incomplete VM (a create cut short) is
        cleaned from its journal.
        """
        name = validate_name(name)
        timeout = self.check_stop_timeout(timeout)
        async with self._lock(name) as lock:
            paths = self.store.paths(name)
            entry = await self.store.entry(name)
            if entry.kind == "missing":
                lock.discard()
                await self.store.load(name)  # raises the usual VMNotFound
            if entry.kind == "symlink":
                await self._run("rm", "-f", "--", paths.directory)  # the link itself (rm never follows it)
                lock.discard()
                return {
                    "stopped_by": "not-a-vm",
                    "removed": [paths.directory],
                    "kept": [],
                    "note": f"{paths.directory} was a symbolic link, not a VM directory: only the link was removed",
                }
            method, _ = await self._stop_locked(name, timeout)
            removed: list[str] = []
            kept: list[str] = []
            notes: list[str] = []
            if entry.definition is not None:
                await self._delete_disk(entry.definition, removed, kept, notes)
            else:
                journal = await self._read_journal(paths)
                removed += await self._remove_disk_of_journal(paths, journal, kept, notes)
            leftover = await self._remove_vm_directory(paths, removed)
            kept += [path for path in leftover if path not in kept]
            if leftover:
                notes.append(f"{paths.directory} still holds files the server did not make; they were kept")
            else:
                lock.discard()
        details: dict[str, Any] = {"stopped_by": method, "removed": removed, "kept": kept}
        if entry.kind != "vm":
            notes.insert(0, f"VM {name} was incomplete (a create cut short or an unreadable definition)")
        if notes:
            details["note"] = "; ".join(notes)
        return details

    async def _delete_disk(
        self, definition: VMDefinition, removed: list[str], kept: list[str], notes: list[str]
    ) -> None:
        disk = definition.disk
        paths = self.store.paths(definition.name)
        if not disk.created_by_tool:
            kept.append(disk.path)
            return
        users = await self._other_users_of(definition.name, disk.path)
        if users:
            kept.append(disk.path)
            notes.append(f"the disk {disk.path} is also the disk of VM {', '.join(users)}; it was kept")
            return
        if await self._is_our_file(disk.path, disk.identity, paths.directory, default=paths.default_disk()):
            await self._run("rm", "-f", "--", disk.path)
            removed.append(disk.path)
        else:
            kept.append(disk.path)
            notes.append(f"{disk.path} is no longer the file create made (or lies where no disk may), so it was kept")

    async def _is_our_file(self, path: str, identity: str | None, own_dir: str, *, default: str = "") -> bool:
        """Whether ``path`` is still the file create made there: inside the fence, and the same file.

        Definitions written before identities were recorded name none; of those, only the default disk
        inside the VM's own directory (a name nothing else could claim) counts as made by create.
        """
        try:
            await self.fence.check("disk", path, own_dir=own_dir)
        except InvalidInput:
            return False
        if identity is None:
            st = await self.host.stat(path, timeout=self.settings.command_timeout)
            return path == default and st is not None and st.is_file
        found = (await self.host.file_ids([path], timeout=self.settings.command_timeout))[path]
        return found == identity

    async def _other_users_of(self, name: str, disk_path: str) -> list[str]:
        scanned, _, _ = await self.store.scan()
        return sorted(d.name for d, _ in scanned if d.name != name and d.disk.path == disk_path)

    async def _read_journal(self, paths: VMPaths) -> dict[str, Any]:
        raw = (await self.host.read_files([paths.journal], timeout=self.settings.command_timeout))[paths.journal]
        try:
            journal = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            return {}
        return journal if isinstance(journal, dict) else {}

    async def _remove_disk_of_journal(
        self, paths: VMPaths, journal: dict[str, Any], kept: list[str], notes: list[str]
    ) -> list[str]:
        """Remove the disk (and its temporary file) an interrupted create made, as its journal records them."""
        removed: list[str] = []
        tmp, disk, identity = journal.get("tmp"), journal.get("disk"), journal.get("identity")
        # A temporary name is random and create's own: whatever is there was made by that create.
        ours = isinstance(tmp, str) and isinstance(disk, str) and tmp == temp_name_pattern(disk, tmp)
        if ours and await self.host.stat(str(tmp), timeout=self.settings.command_timeout) is not None:
            await self._run("rm", "-f", "--", str(tmp))
            removed.append(str(tmp))
        if isinstance(disk, str) and await self.host.stat(disk, timeout=self.settings.command_timeout):
            if isinstance(identity, str) and await self._is_our_file(disk, identity, paths.directory):
                await self._run("rm", "-f", "--", disk)
                removed.append(disk)
            else:
                kept.append(disk)
                notes.append(f"{disk} was not recorded as made by that create, so it was kept")
        return removed

    async def _remove_made(self, paths: VMPaths, journal: dict[str, Any]) -> None:
        """Undo a create that failed in this process: its disk (as the journal records it), then its directory."""
        removed: list[str] = []
        await self._remove_disk_of_journal(paths, journal, [], [])
        await self._remove_vm_directory(paths, removed)

    async def _remove_vm_directory(self, paths: VMPaths, removed: list[str]) -> list[str]:
        """Remove the managed files of ``paths.directory`` and the directory if nothing else is left.

        Returns what was kept (files the server did not make). Never follows a link: the directory was
        checked not to be one, and ``rm -f`` of a link inside removes the link.
        """
        timeout = self.settings.command_timeout
        names = await self.host.list_dir(paths.directory, timeout=timeout)
        ours = [n for n in names if n in MANAGED_NAMES or _MANAGED_TEMP.fullmatch(n)]
        if ours:
            targets = [f"{paths.directory}/{n}" for n in ours]
            stats = await asyncio.gather(*(self.host.stat(t, timeout=timeout) for t in targets))
            files = [t for t, st in zip(targets, stats, strict=True) if st is not None and not st.is_dir]
            if files:
                await self._run("rm", "-f", "--", *files)
        await self.shared.qmp.forget(self.host, paths.qmp_socket)
        left = await self._run("rmdir", "--", paths.directory, check=False)
        if left.succeeded:
            removed.append(paths.directory)
            return []
        remaining = await self.host.list_dir(paths.directory, timeout=timeout)
        return [f"{paths.directory}/{n}" for n in remaining]

    # -- modify ----------------------------------------------------------------------------------

    async def modify(
        self,
        name: str,
        memory: str | None,
        vcpus: int | None,
        disk: str | None,
        timeout: float,
    ) -> tuple[str, dict[str, Any]]:
        """Change memory, vcpus and/or grow the disk; a running VM restarts for memory/vcpus.

        A change that cannot be applied is rolled back: the previous definition is restored and a VM that
        was running is started again as it was; the error says what happened.
        """
        s = self.settings
        name = validate_name(name)
        timeout = self.check_stop_timeout(timeout)
        if memory is None and vcpus is None and not disk:
            raise InvalidInput("modify", "nothing to change; give memory, vcpus and/or disk='size=40G'")
        new_memory = parse_memory_mib(memory, s.max_memory_mib) if memory is not None else None
        new_vcpus = validate_vcpus(vcpus, s.max_vcpus) if vcpus is not None else None
        disk_spec = parse_disk(disk, s.max_disk_gib * GIB) if disk else None
        async with self._lock(name) as lock:
            before = await self._load_locked(name, lock)
            after = before
            if new_memory is not None:
                after = after.evolve(memory_mib=new_memory)
            if new_vcpus is not None:
                after = after.evolve(vcpus=new_vcpus)
            grow_to: int | None = None
            if disk_spec is not None:
                grow_to = self._check_disk_change(before, disk_spec.path, disk_spec.format, disk_spec.size_bytes)
                if grow_to is not None:
                    after = after.evolve(disk=DiskDefinition(**{**before.disk.__dict__, "size_bytes": grow_to}))
            if after == before:
                return f"VM {name} already has that configuration", {
                    "before": before.summary(),
                    "after": after.summary(),
                    "changed": [],
                }
            changed = [k for k, v in after.summary().items() if before.summary()[k] != v]
            state = await self.state_of(before)
            needs_restart = state.status == "running" and (
                after.memory_mib != before.memory_mib or after.vcpus != before.vcpus
            )
            details: dict[str, Any] = {"before": before.summary(), "after": after.summary(), "changed": changed}
            if grow_to is not None:
                paths = self.store.paths(name)
                await self.fence.check("disk", before.disk.path, own_dir=paths.directory)
            if needs_restart:
                await self._restart_with(before, after, grow_to, timeout, details)
            else:
                if grow_to is not None:
                    if state.status == "running":
                        await self._block_resize(before, grow_to)
                        details["disk_resized_by"] = "QMP block_resize"
                    else:
                        await self.disks.resize(before.disk.path, before.disk.format, grow_to)
                        details["disk_resized_by"] = "qemu-img resize"
                await self.store.save(after)
                details["restarted"] = False
        note = " and restarted" if needs_restart else ""
        return f"VM {name} modified{note}: {', '.join(changed)}", details

    async def _restart_with(
        self, before: VMDefinition, after: VMDefinition, grow_to: int | None, timeout: float, details: dict[str, Any]
    ) -> None:
        """Stop, apply, start; on failure restore ``before`` (with a disk already grown) and start it again.

        :raise QemuError: the change could not be applied; ``details`` says what was rolled back.
        """
        method, _ = await self._stop_locked(before.name, timeout)
        details["stopped_by"] = method
        restore = before
        try:
            if grow_to is not None:
                await self.disks.resize(before.disk.path, before.disk.format, grow_to)
                details["disk_resized_by"] = "qemu-img resize"
                restore = before.evolve(disk=after.disk)  # a disk cannot shrink back: keep its new size
            await self.store.save(after)
            await self._start_locked(after)
            details["restarted"] = True
        except QemuMcpError as failure:
            details["restarted"] = False
            details["rolled_back"] = True
            try:
                await self.store.save(restore)
                await self._start_locked(restore)
            except QemuMcpError as again:
                details["restored_definition"] = restore.summary()
                raise QemuError(
                    f"VM {before.name}: the change could not be applied ({failure.message}); the previous "
                    f"configuration was restored, but starting the VM with it failed too ({again.message}); "
                    "the VM is stopped",
                    details,
                ) from failure
            details["restored_definition"] = restore.summary()
            raise QemuError(
                f"VM {before.name}: the change could not be applied ({failure.message}); the previous "
                "configuration was restored and the VM started again as it was",
                details,
            ) from failure

    def _check_disk_change(
        self, before: VMDefinition, path: str | None, fmt: str | None, size: int | None
    ) -> int | None:
        disk = before.disk
        if path is not None and path != disk.path:
            raise InvalidInput("disk", f"modify cannot move the disk ({disk.path}); give only size=, e.g. size=40G")
        if fmt is not None and fmt != disk.format:
            raise InvalidInput("disk", f"modify cannot convert the disk from {disk.format} to {fmt}")
        if size is None or size == disk.size_bytes:
            return None
        if disk.format == "raw":
            raise InvalidInput(
                "disk",
                "raw disks cannot be resized by modify (the spec allows qcow2 only); grow the file by hand "
                "(qemu-img resize -f raw) while the VM is stopped",
            )
        if size < disk.size_bytes:
            raise InvalidInput(
                "disk",
                f"shrinking is refused (current {format_size(disk.size_bytes)}, asked {format_size(size)}); "
                "give a size larger than the current one",
            )
        return size

    async def _block_resize(self, definition: VMDefinition, size: int) -> None:
        async with self._qmp(definition.name) as qmp:
            await qmp.execute("block_resize", {"node-name": "disk0-fmt", "size": size})

    # -- list ------------------------------------------------------------------------------------

    async def list(self) -> tuple[list[tuple[VMDefinition, VMState]], dict[str, list[str]]]:
        """Every VM with its state: one scan of vm_dir, then QMP (in parallel) only for live processes.

        Also what is in ``vm_dir`` but not a VM: ``unreadable`` definitions (and symbolic links) and
        ``incomplete`` directories (a create cut short).
        """
        scanned, broken, incomplete = await self.store.scan()
        definitions = [d for d, _ in scanned]
        facts = {d.name: f for d, f in scanned}
        limiter = asyncio.Semaphore(16)

        async def one(d: VMDefinition) -> VMState:
            if not facts[d.name].alive:
                return VMState("stopped")
            async with limiter:
                return await self.state_of(d, facts[d.name])

        states = await asyncio.gather(*(one(d) for d in definitions))
        problems = {key: names for key, names in (("unreadable", broken), ("incomplete", incomplete)) if names}
        return list(zip(definitions, states, strict=True)), problems


def temp_name_pattern(disk: str, tmp: str) -> str:
    """``tmp`` when it is a name :func:`.disks.temp_name` gives for ``disk``, else ``""``."""
    directory, base = posixpath.split(disk)
    prefix = f"{directory}/.{base}."
    middle = tmp[len(prefix) : -len(".creating")] if tmp.startswith(prefix) and tmp.endswith(".creating") else ""
    return tmp if re.fullmatch(r"[0-9a-f]{12}", middle) else ""
