"""The VMs of one ``vm_dir`` of one host, and what every operation on them needs: their files, their locks,
their QMP sessions, their state, how they are listed.

The operations themselves are objects by concern, each given a :class:`VMDir` (and the other operations it
uses): :mod:`.create`, :mod:`.power`, :mod:`.delete`, :mod:`.modify` here, and the capabilities' (guest,
console, storage); :class:`.manager.VMManager` puts them together.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from ..config import Settings
from ..console.text import decode_console, strip_terminal_escapes, tail_lines
from ..errors import (
    InvalidInput,
    OperationTimeout,
    QemuMcpError,
    QMPFailure,
    QMPUnavailable,
    VMNotFound,
    VMStateError,
)
from ..hosts.base import FileLock, Host
from .fence import Fence
from .index import VMIndex
from .paths import VMPaths
from .qmp import QMPSession
from .shared import SharedState
from .spec import (
    VMDefinition,
    validate_name,
    validate_path,
)
from .store import ProcessFacts, VMStore, process_matches

__all__ = ["CONSOLE_TAIL_LINES", "StopMethod", "VMDir", "VMState", "now"]

log = logging.getLogger(__name__)

StopMethod = Literal["acpi", "guest-agent", "quit", "sigkill", "already-stopped"]
#: Lines of the serial console a failed wait shows.
CONSOLE_TAIL_LINES = 30


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


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class VMDir:
    """The VMs of one ``vm_dir`` of one host: what every operation on them needs."""

    def __init__(
        self,
        host: Host,
        vm_dir: str,
        settings: Settings,
        shared: SharedState,
        fence: Fence,
        index: VMIndex | None = None,
    ) -> None:
        self.host = host
        #: The host's index of VMs outside its default vm_dir (None: not kept, e.g. in unit tests).
        self.index = index
        self.vm_dir = validate_path(vm_dir, "vm_dir")
        self.settings = settings
        self.shared = shared
        self.fence = fence
        self.store = VMStore(host, self.vm_dir, settings.command_timeout)

    @asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[FileLock]:
        """VM ``name`` held by this call, against the server's other calls and other server processes.

        :raise OperationTimeout: another operation held it for longer than ``--lock-timeout``.
        """
        # In-process first (cheap, fair), then the lock file that another server process sharing
        # this vm_dir also takes. The lock files live apart from the VM directory, which delete removes;
        # an operation that finds no VM discards its lock file, so unknown names leave nothing behind.
        async with (
            self.shared.vm_lock(self.host.identity, self.vm_dir, name, self.settings.lock_timeout),
            self.host.lock_file(self.store.paths(name).lock_file, timeout=self.settings.lock_timeout) as lock,
        ):
            yield lock

    async def load_locked(self, name: str, lock: FileLock) -> VMDefinition:
        """The definition of ``name``, under its ``lock``; an unknown name leaves no lock file behind.

        :raise VMNotFound: there is no VM of that name.
        """
        try:
            return await self.store.load(name)
        except VMNotFound:
            lock.discard()
            raise

    async def load_running(self, name: str, advice: str = "start it first") -> VMDefinition:
        """The definition of ``name``, which must be running.

        :raise VMStateError: it is not (the message ends with ``advice``).
        """
        definition = await self.store.load(validate_name(name))
        facts = (await self.store.process_facts([definition.name]))[definition.name]
        if not facts.alive:
            raise VMStateError(f"VM {definition.name} is not running; {advice}")
        return definition

    async def run(self, *argv: str, check: bool = True, timeout: float | None = None) -> Any:
        return await self.host.run(argv, timeout=timeout or self.settings.command_timeout, check=check)

    def qmp(self, name: str) -> AbstractAsyncContextManager[QMPSession]:
        """The shared QMP connection of VM ``name``."""
        return self.shared.qmp.session(self.host, self.store.paths(name).qmp_socket, name, self.settings.qmp_timeout)

    async def state_of(self, definition: VMDefinition, facts: ProcessFacts | None = None) -> VMState:
        if facts is None:
            facts = (await self.store.process_facts([definition.name]))[definition.name]
        if not facts.alive:
            return VMState("stopped")
        try:
            async with self.qmp(definition.name) as qmp:
                status = await qmp.execute("query-status")
            run_state = str(status.get("status", "unknown"))
        except (QMPUnavailable, OperationTimeout, QMPFailure):
            run_state = "unresponsive"
        accel = facts.runtime.get("accel")
        return VMState("running", pid=facts.pid, run_state=run_state, accel=str(accel) if accel else None)

    async def wait_gone(self, paths: VMPaths, pid: int, timeout: float) -> bool:
        """Whether the QEMU of ``paths`` (pid ``pid``) is gone within ``timeout`` seconds."""
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

    async def clean_runtime_files(self, paths: VMPaths) -> None:
        """Forget the connections of a stopped VM and remove its sockets, pid file and run-time facts."""
        await self.shared.qmp.forget(self.host, paths.qmp_socket)
        await self.shared.agents.forget(self.host, paths.qga_socket)
        await self.run(
            "rm", "-f", "--", paths.qmp_socket, paths.qga_socket, paths.console_socket, paths.vnc_socket,
            paths.pidfile, paths.runtime,
        )  # fmt: skip

    async def check_iso(self, iso: str) -> None:
        """:raise InvalidInput: ``iso`` breaks the fence, or is not a regular file on the host."""
        real = await self.fence.check("iso", iso)
        st = await self.host.stat(real, timeout=self.settings.command_timeout)
        if st is None or not st.is_file:
            raise InvalidInput("iso", f"{iso} does not exist on {self.host.name} or is not a regular file")

    async def linked_clones_of(self, definition: VMDefinition) -> list[str]:
        """The VMs of this vm_dir whose disk is a linked clone of ``definition``'s disk (one scan)."""
        scanned, _, _ = await self.store.scan()
        return sorted(
            d.name
            for d, _ in scanned
            if d.name != definition.name
            and d.image is not None
            and d.image.get("clone") == "linked"
            and d.image.get("path") == definition.disk.path
        )

    def row(self, definition: VMDefinition, state: VMState) -> dict[str, Any]:
        """One VM as ``list_vms`` (and the ``vm://`` resource) shows it."""
        row = {"name": definition.name, **definition.summary(), **state.summary()}
        ssh = self.ssh_hint(definition)
        if ssh is not None:
            row["ssh"] = ssh
        return row

    def ssh_hint(self, definition: VMDefinition) -> dict[str, Any] | None:
        """How a person logs in to the guest's forwarded port 22 (from the definition: no guest round trip)."""
        port = definition.ssh_port
        if port is None:
            return None
        address = "127.0.0.1" if self.settings.forward_address == "0.0.0.0" else self.settings.forward_address
        config = (definition.cloud_init or {}).get("config") or {}
        user = config.get("user") if isinstance(config.get("user"), str) else None
        login = f"{user}@{address}" if user else address
        hint: dict[str, Any] = {"host": address, "port": port, "user": user, "command": f"ssh -p {port} {login}"}
        if self.host.ssh_jump is not None:
            hint["on_host"] = self.host.name
            hint["command"] = f"ssh -J {self.host.ssh_jump} -p {port} {login}"
            hint["note"] = f"the port is bound on {self.host.name}, not on the server: reach it through that host"
        return hint

    def check_stop_timeout(self, timeout: float) -> float:
        """:raise InvalidInput: not a finite number of seconds within 0 .. the server's maximum."""
        limit = self.settings.max_stop_timeout
        if not math.isfinite(timeout) or not 0 <= timeout <= limit:
            raise InvalidInput("stop_timeout", f"{timeout!r} must be a number of seconds from 0 to {limit:g}")
        return timeout

    async def console_tail(self, name: str, lines: int = CONSOLE_TAIL_LINES) -> list[str]:
        """The last lines of VM ``name``'s serial console log, escape sequences stripped (a guest writes it:
        bounded); what tells a person why a guest did not come up. Empty when the log cannot be read."""
        path = self.store.paths(name).console_log
        try:
            data, _ = await self.host.read_range(path, offset=None, length=16384, timeout=self.settings.command_timeout)
        except QemuMcpError:
            return []
        text = tail_lines(strip_terminal_escapes(decode_console(data)), lines)
        return [line[:500] for line in text.splitlines()]

    async def list_elsewhere(self) -> tuple[list[tuple[str, VMDefinition, VMState]], list[str]]:
        """The VMs the host's index places outside this (default) vm_dir: ``(vm_dir, definition, state)``,
        and the directories that could not be listed (with why). Entries whose VM is gone are left out."""
        if self.index is None or self.vm_dir != self.index.default:
            return [], []
        by_dir: dict[str, set[str]] = {}
        for name, directory in (await self.index.entries()).items():
            if directory != self.vm_dir:
                by_dir.setdefault(directory, set()).add(name)
        found: list[tuple[str, VMDefinition, VMState]] = []
        problems: list[str] = []
        for directory, names in sorted(by_dir.items()):
            try:
                await self.fence.check("vm_dir", directory)
                other = VMDir(self.host, directory, self.settings, self.shared, self.fence, self.index)
                listed, _ = await other.list()
            except QemuMcpError as exc:
                problems.append(f"{directory}: {exc.message}")
                continue
            found += [(directory, d, state) for d, state in listed if d.name in names]
        return found, problems

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
            async with limiter:
                return await self.state_of(d, facts[d.name])

        # QMP (a task each) only for live processes: a stopped VM's state is known from the scan.
        live = [d for d in definitions if facts[d.name].alive]
        asked = dict(zip((d.name for d in live), await asyncio.gather(*(one(d) for d in live)), strict=True))
        stopped = VMState("stopped")
        states = [asked.get(d.name, stopped) for d in definitions]
        problems = {key: names for key, names in (("unreadable", broken), ("incomplete", incomplete)) if names}
        return list(zip(definitions, states, strict=True)), problems
