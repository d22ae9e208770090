"""VM operations on any host: create, start, stop, delete, modify, status.

These functions know a :class:`Host`, never whether it is local or remote.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import Settings
from ..errors import (
    CommandFailed,
    InvalidInput,
    OperationTimeout,
    QemuError,
    QemuMcpError,
    QMPFailure,
    QMPUnavailable,
    VMExists,
    VMStateError,
)
from ..hosts.base import Host
from ..qmp import QMPPool, QMPSession
from ..security import StreamLimiter
from ..shutdown import ShutdownSignal
from .accel import AccelProbe
from .argv import ARM64_FIRMWARE, qemu_argv
from .paths import UNIX_PATH_MAX, VMPaths
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
from .store import ProcessFacts, VMStore

__all__ = ["SharedState", "VMManager", "VMState"]

log = logging.getLogger(__name__)

DEFAULT_DISK_BYTES = 20 * GIB
StopMethod = Literal["acpi", "quit", "sigkill", "already-stopped"]


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
    async def vm_lock(self, host: str, vm_dir: str, name: str) -> AsyncIterator[None]:
        key = (host, vm_dir, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
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

    def __init__(self, host: Host, vm_dir: str, settings: Settings, shared: SharedState) -> None:
        self.host = host
        self.vm_dir = validate_path(vm_dir, "vm_dir")
        self.settings = settings
        self.shared = shared
        self.store = VMStore(host, self.vm_dir, settings.command_timeout)

    # -- helpers ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        # In-process first (cheap, fair), then the lock file that another server process sharing
        # this vm_dir also takes. The lock files live apart from the VM directory, which delete removes.
        async with (
            self.shared.vm_lock(getattr(self.host, "identity", self.host.name), self.vm_dir, name),
            self.host.lock_file(self.store.paths(name).lock_file, timeout=self.settings.lock_timeout),
        ):
            yield

    async def _run(self, *argv: str, check: bool = True, timeout: float | None = None) -> Any:
        return await self.host.run(argv, timeout=timeout or self.settings.command_timeout, check=check)

    async def state_of(self, definition: VMDefinition, facts: ProcessFacts | None = None) -> VMState:
        if facts is None:
            facts = (await self.store.process_facts([definition.name]))[definition.name]
        if not facts.alive:
            return VMState("stopped")
        paths = self.store.paths(definition.name)
        try:
            async with self.shared.qmp.session(
                self.host, paths.qmp_socket, definition.name, self.settings.qmp_timeout
            ) as qmp:
                status = await qmp.execute("query-status")
            run_state = str(status.get("status", "unknown"))
        except (QMPUnavailable, OperationTimeout, QMPFailure):
            run_state = "unresponsive"
        accel = facts.runtime.get("accel")
        return VMState(
            "running",
            pid=facts.pid,
            run_state=run_state,
            accel=str(accel) if accel else None,
        )

    async def _wait_gone(self, paths: VMPaths, pid: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        proc = f"/proc/{pid}/cmdline"
        from .store import process_matches

        while True:
            cmdline = (await self.host.read_files([proc], timeout=self.settings.command_timeout))[proc]
            if not process_matches(cmdline, paths):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    def _qmp(self, name: str) -> AbstractAsyncContextManager[QMPSession]:
        """The shared QMP connection of VM ``name``."""
        return self.shared.qmp.session(self.host, self.store.paths(name).qmp_socket, name, self.settings.qmp_timeout)

    async def _clean_runtime_files(self, paths: VMPaths) -> None:
        await self.shared.qmp.forget(self.host, paths.qmp_socket)
        await self._run("rm", "-f", "--", paths.qmp_socket, paths.qga_socket, paths.pidfile, paths.runtime)

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

        On any failure nothing is left behind: the disk the call made and the VM directory are removed.
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

        async with self._lock(name):
            if iso_path is not None:
                st = await self.host.stat(iso_path, timeout=s.command_timeout)
                if st is None or not (st.is_file or st.is_symlink):
                    raise InvalidInput(
                        "iso",
                        f"{iso_path} does not exist on {self.host.name} or is not a file",
                    )
            await self._run("mkdir", "-p", "--", self.vm_dir)
            claimed = await self._run("mkdir", "--", paths.directory, check=False)
            if not claimed.succeeded:
                if await self.host.stat(paths.definition, timeout=s.command_timeout) is not None:
                    raise VMExists(f"VM {name} already exists on {self.host.name}; delete it first or use another name")
                raise VMExists(
                    f"{paths.directory} already exists on {self.host.name} but holds no VM definition "
                    "(a leftover?); remove it or use another name"
                )
            created_disk = False
            try:
                existing = await self.host.stat(disk_path, timeout=s.command_timeout)
                if existing is not None:
                    disk_def = await self._attach_existing_disk(disk_path, disk_spec.format, disk_spec.size_bytes)
                else:
                    parent = disk_path.rsplit("/", 1)[0] or "/"
                    if await self.host.stat(parent, timeout=s.command_timeout) is None:
                        raise InvalidInput(
                            "disk",
                            f"directory {parent} does not exist on {self.host.name}",
                        )
                    size = disk_spec.size_bytes or DEFAULT_DISK_BYTES
                    await self._qemu_img("create", "-q", "-f", disk_format, disk_path, str(size))
                    created_disk = True
                    disk_def = DiskDefinition(disk_path, disk_format, size, created_by_tool=True)
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
            except BaseException:
                await asyncio.shield(self._undo_create(paths, disk_path if created_disk else None))
                raise
        details = {
            "vm_dir": self.vm_dir,
            "directory": paths.directory,
            **definition.summary(),
        }
        if not disk_def.created_by_tool:
            details["disk_attached"] = "existing disk attached; delete will keep it"
        return details

    async def _attach_existing_disk(self, path: str, fmt: str | None, size: int | None) -> DiskDefinition:
        info = await self._disk_info(path)
        actual_format = info.get("format")
        if actual_format not in ("qcow2", "raw"):
            raise InvalidInput(
                "disk",
                f"{path} exists and is {actual_format!r}; only qcow2 and raw are supported",
            )
        if fmt is not None and fmt != actual_format:
            raise InvalidInput("disk", f"{path} exists and is {actual_format}, not {fmt}")
        virtual = int(info.get("virtual-size", 0))
        if size is not None and size != virtual:
            raise InvalidInput(
                "disk",
                f"{path} exists with size {format_size(virtual)}; omit size to attach it as it is, "
                "or grow it later with modify",
            )
        return DiskDefinition(path, actual_format, virtual, created_by_tool=False)

    async def _disk_info(self, path: str) -> dict[str, Any]:
        # -U: the image may be in use by a running QEMU, which holds the write lock.
        result = await self._qemu_img("info", "-U", "--output=json", path)
        try:
            info: dict[str, Any] = json.loads(result.stdout)
        except ValueError as exc:
            raise QemuError(f"qemu-img info {path}: unreadable output") from exc
        return info

    async def _qemu_img(self, *args: str) -> Any:
        try:
            return await self._run("qemu-img", *args)
        except CommandFailed as exc:
            raise QemuError(f"qemu-img {args[0]} failed: {exc.stderr.strip()}") from exc

    async def _prepare_efi_vars(self, paths: VMPaths) -> None:
        template = ARM64_FIRMWARE.vars_template
        if await self.host.stat(template, timeout=self.settings.command_timeout) is None:
            raise QemuError(f"UEFI firmware {template} is missing on {self.host.name}; install qemu-efi-aarch64 there")
        await self._run("cp", "--", template, paths.efi_vars)

    async def _undo_create(self, paths: VMPaths, created_disk: str | None) -> None:
        try:
            if created_disk is not None:
                await self._run("rm", "-f", "--", created_disk)
            await self._run("rm", "-rf", "--", paths.directory)
        except QemuMcpError:
            log.exception(
                "could not undo the partial create of %s on %s",
                paths.name,
                self.host.name,
            )

    # -- start -----------------------------------------------------------------------------------

    async def start(self, name: str) -> tuple[str, dict[str, Any]]:
        """Start the VM daemonized; return once QMP says running."""
        name = validate_name(name)
        async with self._lock(name):
            definition = await self.store.load(name)
            return await self._start_locked(definition)

    async def _start_locked(self, definition: VMDefinition) -> tuple[str, dict[str, Any]]:
        name = definition.name
        paths = self.store.paths(name)
        state = await self.state_of(definition)
        if state.status == "running":
            return f"VM {name} is already running", state.summary()
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
                async with self.shared.qmp.session(
                    self.host,
                    paths.qmp_socket,
                    definition.name,
                    self.settings.qmp_timeout,
                ) as q:
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

    async def stop(self, name: str, timeout: float) -> tuple[str, dict[str, Any]]:
        """ACPI power-down, then QMP ``quit`` after ``timeout``, then SIGKILL as the last resort."""
        name = validate_name(name)
        if timeout < 0:
            raise InvalidInput("stop_timeout", "must be >= 0 seconds")
        async with self._lock(name):
            definition = await self.store.load(name)
            method, seconds = await self._stop_locked(definition, timeout)
        if method == "already-stopped":
            return f"VM {name} is already stopped", {
                "status": "stopped",
                "stopped_by": method,
            }
        how = {"acpi": "ACPI shutdown", "quit": "QMP quit", "sigkill": "SIGKILL"}[method]
        return f"VM {name} stopped ({how})", {
            "status": "stopped",
            "stopped_by": method,
            "stop_seconds": seconds,
        }

    async def _stop_locked(self, definition: VMDefinition, timeout: float) -> tuple[StopMethod, float]:
        paths = self.store.paths(definition.name)
        facts = (await self.store.process_facts([definition.name]))[definition.name]
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
                async with self.shared.qmp.session(
                    self.host,
                    paths.qmp_socket,
                    definition.name,
                    self.settings.qmp_timeout,
                ) as q:
                    await q.execute(command)
            except (QMPUnavailable, OperationTimeout, QMPFailure) as exc:
                log.info("QMP %s of %s failed: %s", command, definition.name, exc)
            if await self._wait_gone(paths, pid, wait):
                method = step  # type: ignore[assignment]
                break
        if method is None:
            await self._run("kill", "-KILL", str(pid), check=False)
            if not await self._wait_gone(paths, pid, 5.0):
                raise VMStateError(f"VM {definition.name} (pid {pid}) survived SIGKILL")
            method = "sigkill"
        await self._clean_runtime_files(paths)
        return method, round(loop.time() - began, 3)

    # -- delete ----------------------------------------------------------------------------------

    async def delete(self, name: str, timeout: float) -> dict[str, Any]:
        """Stop if running; remove the VM directory and the disks the tool created, nothing else."""
        name = validate_name(name)
        async with self._lock(name):
            definition = await self.store.load(name)
            paths = self.store.paths(name)
            disk = definition.disk
            inside = disk.path.startswith(paths.directory + "/")
            if inside and not disk.created_by_tool:
                # Refuse before touching anything: removing the directory would take the user's disk with it.
                raise VMStateError(
                    f"VM {name} has an attached disk inside its directory ({disk.path}); move it out before delete"
                )
            method, _ = await self._stop_locked(definition, timeout)
            removed: list[str] = []
            kept: list[str] = []
            if disk.created_by_tool:
                if not inside:
                    await self._run("rm", "-f", "--", disk.path)
                removed.append(disk.path)
            else:
                kept.append(disk.path)
            # rm never follows symlinks inside the tree, and the directory path itself holds no symlink we made.
            await self._run("rm", "-rf", "--", paths.directory)
            removed.append(paths.directory)
        return {"stopped_by": method, "removed": removed, "kept": kept}

    # -- modify ----------------------------------------------------------------------------------

    async def modify(
        self,
        name: str,
        memory: str | None,
        vcpus: int | None,
        disk: str | None,
        timeout: float,
    ) -> tuple[str, dict[str, Any]]:
        """Change memory, vcpus and/or grow the disk; a running VM restarts for memory/vcpus."""
        s = self.settings
        name = validate_name(name)
        if memory is None and vcpus is None and not disk:
            raise InvalidInput("modify", "nothing to change; give memory, vcpus and/or disk='size=40G'")
        new_memory = parse_memory_mib(memory, s.max_memory_mib) if memory is not None else None
        new_vcpus = validate_vcpus(vcpus, s.max_vcpus) if vcpus is not None else None
        disk_spec = parse_disk(disk, s.max_disk_gib * GIB) if disk else None
        async with self._lock(name):
            before = await self.store.load(name)
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
            details: dict[str, Any] = {
                "before": before.summary(),
                "after": after.summary(),
                "changed": changed,
            }
            if needs_restart:
                method, _ = await self._stop_locked(before, timeout)
                details["stopped_by"] = method
                if grow_to is not None:
                    await self._qemu_img("resize", "-q", before.disk.path, str(grow_to))
                    details["disk_resized_by"] = "qemu-img resize"
                await self.store.save(after)
                await self._start_locked(after)
                details["restarted"] = True
            else:
                if grow_to is not None:
                    if state.status == "running":
                        await self._block_resize(before, grow_to)
                        details["disk_resized_by"] = "QMP block_resize"
                    else:
                        await self._qemu_img("resize", "-q", before.disk.path, str(grow_to))
                        details["disk_resized_by"] = "qemu-img resize"
                await self.store.save(after)
                details["restarted"] = False
        note = " and restarted" if needs_restart else ""
        return f"VM {name} modified{note}: {', '.join(changed)}", details

    def _check_disk_change(
        self, before: VMDefinition, path: str | None, fmt: str | None, size: int | None
    ) -> int | None:
        disk = before.disk
        if path is not None and path != disk.path:
            raise InvalidInput(
                "disk",
                f"modify cannot move the disk ({disk.path}); give only size=, e.g. size=40G",
            )
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
        paths = self.store.paths(definition.name)
        async with self.shared.qmp.session(
            self.host, paths.qmp_socket, definition.name, self.settings.qmp_timeout
        ) as qmp:
            await qmp.execute("block_resize", {"node-name": "disk0-fmt", "size": size})

    # -- list ------------------------------------------------------------------------------------

    async def list(self) -> tuple[list[tuple[VMDefinition, VMState]], dict[str, list[str]]]:
        """Every VM with its state: one scan of vm_dir, then QMP (in parallel) only for live processes.

        Also what is in ``vm_dir`` but not a VM: ``unreadable`` definitions and ``incomplete``
        directories (a create cut short).
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
