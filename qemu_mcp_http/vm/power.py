"""Start and stop: QEMU daemonized until QMP says running; ACPI power-down, then QMP quit, then SIGKILL."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..errors import (
    OperationTimeout,
    QemuError,
    QemuMcpError,
    QMPFailure,
    QMPUnavailable,
    VMStateError,
)
from ..guest.readiness import Progress, check_wait, guest_facts, wait_ready
from ..net.hostports import assign_ports, forward_failure, used_ports
from ..storage.disks import DiskImages
from .argv import qemu_argv
from .commands import qemu_installed
from .paths import VMPaths
from .spec import (
    VMDefinition,
    validate_name,
)
from .vmdir import StopMethod, VMDir, now

__all__ = ["PowerOps"]

log = logging.getLogger(__name__)


_HOW = {"acpi": "ACPI shutdown", "guest-agent": "guest agent shutdown", "quit": "QMP quit", "sigkill": "SIGKILL"}


class PowerOps:
    """start, stop; delete and modify stop and start through these too."""

    #: How long stop waits for QEMU to obey QMP ``quit`` before SIGKILL.
    quit_wait: float = 5.0
    #: A guest may drop power-button presses (Debian, until systemd-logind runs): press again this often.
    acpi_resend: float = 5.0
    #: Try the guest agent's ``guest-shutdown`` once the first press had this long to work.
    agent_grace: float = 3.0

    def __init__(self, vms: VMDir, disks: DiskImages) -> None:
        self.vms = vms
        self.disks = disks

    async def start(
        self, name: str, wait: str = "running", wait_timeout: float = 300.0, progress: Progress | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Start the VM daemonized; return once QMP says running, or (``wait``) once its guest agent answers or
        its forwarded SSH port sends a banner. The wait holds no lock: other calls on the VM go on meanwhile.

        :raise GuestNotReady: the guest did not become ready within ``wait_timeout`` (it is left running).
        """
        name = validate_name(name)
        mode = check_wait(wait, wait_timeout, self.vms.settings.max_wait_timeout)
        async with self.vms.lock(name) as lock:
            definition = await self.vms.load_locked(name, lock)
            check_wait(mode, wait_timeout, self.vms.settings.max_wait_timeout, definition)
            message, details = await self.start_locked(definition)
            definition = await self.vms.store.load(name)  # with the host ports this start chose
        if mode != "running":
            ready = await wait_ready(self.vms, definition, mode, wait_timeout, progress)
            details.update(ready)
            message += (
                f"; {'its guest agent answers' if mode == 'agent' else 'SSH answers'} ({ready['waited_seconds']} s)"
            )
        if mode == "ssh" or mode == "agent":
            facts = await guest_facts(self.vms, definition, 2.0)
            if facts is not None:
                details["guest"] = facts
        ssh = self.vms.ssh_hint(definition)
        if ssh is not None:
            details["ssh"] = ssh
        if definition.ports:
            details["ports"] = definition.summary()["ports"]
        return message, details

    async def start_locked(self, definition: VMDefinition) -> tuple[str, dict[str, Any]]:
        name = definition.name
        paths = self.vms.store.paths(name)
        state = await self.vms.state_of(definition)
        if state.status == "running":
            return f"VM {name} is already running", state.summary()
        clones = await self.vms.linked_clones_of(definition)
        if clones:
            raise VMStateError(
                f"the disk of VM {name} is the base of linked clones ({', '.join(clones)}): a running VM writes its "
                "disk, which would corrupt them; delete them first, or clone it with clone='full'"
            )
        await self._verify_media(definition)
        definition = await self._assign_ports(definition)
        await self.vms.clean_runtime_files(paths)
        accel = await self._choose_accel(definition)
        argv = qemu_argv(definition, paths, accel, forward_address=self.vms.settings.forward_address)
        loop = asyncio.get_running_loop()
        began = loop.time()
        with qemu_installed():
            result = await self.vms.host.run(argv, timeout=self.vms.settings.start_timeout, check=False)
        if not result.succeeded:
            stderr = result.stderr.strip()
            forward = forward_failure(stderr, self.vms.host.name)
            if forward is not None:
                raise VMStateError(f"VM {name} did not start: {forward}")
            if "bridge" in stderr and definition.network_spec.mode == "bridge":
                raise QemuError(
                    f"VM {name} could not join bridge {definition.network_spec.bridge} on {self.vms.host.name}: "
                    f"{stderr}; "
                    "the bridge must exist and be allowed in /etc/qemu/bridge.conf ('allow <name>'), and "
                    "qemu-bridge-helper must be setuid root"
                )
            raise QemuError(f"QEMU failed to start VM {name}: {stderr or f'exit status {result.returncode}'}")
        run_state = await self._wait_running(definition, paths, began + self.vms.settings.start_timeout)
        facts = (await self.vms.store.process_facts([name]))[name]
        await self.vms.store.save_runtime(name, {"accel": accel, "pid": facts.pid, "started_at": now(), "argv": argv})
        details = {
            "status": "running",
            "run_state": run_state,
            "pid": facts.pid,
            "accel": accel,
            "qmp_socket": paths.qmp_socket,
            "console_log": paths.console_log,
            "start_seconds": round(loop.time() - began, 3),
        }
        return f"VM {name} started on {self.vms.host.name} ({accel})", details

    async def _verify_media(self, definition: VMDefinition) -> None:
        """Check the disk and ISO a definition names, as on create: the files may have changed since.

        :raise InvalidInput: a path breaks the fence, or the disk's chain is not safe to open.
        """
        paths = self.vms.store.paths(definition.name)
        disk = definition.disk
        await self.vms.fence.check("disk", disk.path, own_dir=paths.directory)
        await self.disks.inspect(disk.path, disk.format, own_dir=paths.directory)
        if definition.iso is not None:
            await self.vms.check_iso(definition.iso)

    async def _assign_ports(self, definition: VMDefinition) -> VMDefinition:
        """The definition with a host port for every forward (saved when it changed).

        :raise VMStateError: a fixed host port is in use on the host.
        """
        if not definition.forwards:
            return definition
        used = await used_ports(self.vms.host, self.vms.settings.command_timeout)
        assigned = assign_ports(definition, used, self.vms.host.name)
        if assigned != definition.port_assignments:
            definition = definition.evolve(port_assignments=assigned)
            await self.vms.store.save(definition)
        return definition

    async def _choose_accel(self, definition: VMDefinition) -> str:
        if self.vms.settings.accel != "auto":
            return self.vms.settings.accel
        choice = await self.vms.shared.accel_probe.choose(
            self.vms.host,
            definition.arch,
            self.vms.settings,
            self.vms.store.paths(definition.name).directory,
        )
        return choice.accel

    async def _wait_running(self, definition: VMDefinition, paths: VMPaths, deadline: float) -> str:
        loop = asyncio.get_running_loop()
        last: QemuMcpError | None = None
        while loop.time() < deadline:
            try:
                async with self.vms.qmp(definition.name) as q:
                    status = await q.execute("query-status")
                    if status.get("status") == "running":
                        return "running"
                    last = VMStateError(f"QEMU reports {status.get('status')}")
            except (QMPUnavailable, OperationTimeout) as exc:
                last = exc
            await asyncio.sleep(0.05)
        raise QemuError(
            f"VM {definition.name} did not reach 'running' within {self.vms.settings.start_timeout:g} s: {last}"
        )

    async def stop(self, name: str, timeout: float) -> tuple[str, dict[str, Any]]:
        """ACPI power-down, then QMP ``quit`` after ``timeout``, then SIGKILL as the last resort."""
        name = validate_name(name)
        timeout = self.vms.check_stop_timeout(timeout)
        async with self.vms.lock(name) as lock:
            definition = await self.vms.load_locked(name, lock)
            method, seconds = await self.stop_locked(definition.name, timeout)
        if method == "already-stopped":
            return f"VM {name} is already stopped", {"status": "stopped", "stopped_by": method}
        return f"VM {name} stopped ({_HOW[method]})", {
            "status": "stopped",
            "stopped_by": method,
            "stop_seconds": seconds,
        }

    async def stop_locked(self, name: str, timeout: float) -> tuple[StopMethod, float]:
        paths = self.vms.store.paths(name)
        facts = (await self.vms.store.process_facts([name]))[name]
        if not facts.alive or facts.pid is None:
            await self.vms.clean_runtime_files(paths)
            return "already-stopped", 0.0
        pid = facts.pid
        loop = asyncio.get_running_loop()
        began = loop.time()
        method: StopMethod | None = await self._graceful_stop(name, paths, pid, timeout)
        if method is None:
            await self._qmp_command(name, "quit")
            if await self.vms.wait_gone(paths, pid, self.quit_wait):
                method = "quit"
        if method is None:
            await self.vms.run("kill", "-KILL", str(pid), check=False)
            if not await self.vms.wait_gone(paths, pid, 5.0):
                raise VMStateError(f"VM {name} (pid {pid}) survived SIGKILL")
            method = "sigkill"
        await self.vms.clean_runtime_files(paths)
        return method, round(loop.time() - began, 3)

    async def _graceful_stop(self, name: str, paths: VMPaths, pid: int, timeout: float) -> StopMethod | None:
        """Press the power button, again every ``acpi_resend`` s (a guest may drop early presses), and once the
        first press had ``agent_grace`` s, ask the guest agent too (``guest-shutdown``); ``None``: still running
        after ``timeout``."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + timeout
        next_press, next_agent, agent_took = began, began + self.agent_grace, False
        while True:
            now = loop.time()
            if now >= next_press:
                await self._qmp_command(name, "system_powerdown")
                next_press = now + self.acpi_resend
            if not agent_took and now >= next_agent:
                agent_took = await self._agent_shutdown(paths)
                next_agent = loop.time() + 2 * self.acpi_resend
            if await self.vms.wait_gone(paths, pid, max(0.0, min(deadline - loop.time(), 0.5))):
                return "guest-agent" if agent_took else "acpi"
            if loop.time() >= deadline:
                return None

    async def _qmp_command(self, name: str, command: str) -> None:
        try:
            async with self.vms.qmp(name) as q:
                await q.execute(command)
        except (QMPUnavailable, OperationTimeout, QMPFailure) as exc:
            log.info("QMP %s of %s failed: %s", command, name, exc)

    async def _agent_shutdown(self, paths: VMPaths) -> bool:
        """Whether the guest agent answered and was asked to power the guest off."""
        try:
            async with self.vms.shared.agents.session(self.vms.host, paths.qga_socket, 1.0) as agent:
                await agent.execute("guest-ping")
                await agent.send_only("guest-shutdown", {"mode": "powerdown"})
        except QemuMcpError:
            return False
        return True
