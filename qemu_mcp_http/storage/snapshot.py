"""Internal qcow2 snapshots of a VM's disk (``vm_snapshot``): create, list, revert, delete.

A stopped VM's snapshots are made with ``qemu-img snapshot``; a running VM's through QMP: ``snapshot-save`` /
``snapshot-load`` / ``snapshot-delete`` jobs (with the RAM and device state: the guest goes on from the saved
moment), or ``blockdev-snapshot-internal-sync`` for the disk alone.  Jobs are watched with ``query-jobs``,
their progress reported, bounded by a timeout, and dismissed whatever happened; a failed job leaves the VM as it
was and the error says what QEMU said.  Only qcow2 disks the tool created are snapshotted: a raw disk cannot
hold snapshots, and an attached disk is its owner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import InvalidInput, OperationTimeout, QemuError, QMPFailure, VMStateError
from ..vm.qmp import QMPSession
from ..vm.spec import NAME_RE, DiskDefinition, VMDefinition, format_size, validate_name
from ..vm.vmdir import VMDir
from .disks import DiskImages

__all__ = ["SnapshotOps"]

Progress = Callable[[float, str], Awaitable[None]]
#: The block node of a VM's disk (``-drive ... node-name=disk0-fmt``, see argv.py).
DISK_NODE = "disk0-fmt"


class SnapshotOps:
    """create, list, revert, delete; and the snapshots a disk holds, for delete, modify and the resources."""

    def __init__(self, vms: VMDir, disks: DiskImages) -> None:
        self.vms = vms
        self.disks = disks

    def _snapshot_disk(self, definition: VMDefinition) -> None:
        """:raise VMStateError: the disk cannot hold the tool's snapshots."""
        disk = definition.disk
        if disk.format != "qcow2":
            raise VMStateError(
                f"VM {definition.name} has a raw disk, which cannot hold snapshots; snapshots need a qcow2 disk"
            )
        if not disk.created_by_tool:
            raise VMStateError(
                f"VM {definition.name}'s disk {disk.path} was attached, not made by this server: its snapshots are "
                "its owner's to take (qemu-img snapshot), not this tool's"
            )

    async def _snapshot_target(self, name: str) -> tuple[VMDefinition, bool]:
        definition = await self.vms.store.load(validate_name(name))
        self._snapshot_disk(definition)
        running = (await self.vms.state_of(definition)).status == "running"
        return definition, running

    async def snapshot_list(self, name: str) -> list[dict[str, Any]]:
        """The disk's snapshots: name, date, VM clock, size of the saved RAM (0: disk only)."""
        definition, running = await self._snapshot_target(name)
        return await self._list(definition, running)

    async def _list(self, definition: VMDefinition, running: bool) -> list[dict[str, Any]]:
        snapshots, _ = await self.disk_snapshots(definition, running)
        return snapshots

    async def snapshot_create(
        self, name: str, snapshot: str | None, memory: bool | None, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Save the disk (and, for a running VM by default, its RAM and device state) under ``snapshot``.

        :raise InvalidInput: a bad or taken snapshot name, or memory for a stopped VM.
        """
        tag = validate_snapshot_name(snapshot) if snapshot is not None else _default_name()
        async with self.vms.lock(validate_name(name)) as lock:
            definition = await self.vms.load_locked(name, lock)
            self._snapshot_disk(definition)
            running = (await self.vms.state_of(definition)).status == "running"
            with_memory = running if memory is None else memory
            if with_memory and not running:
                raise InvalidInput("memory", f"VM {name} is stopped: it has no memory to save; omit memory")
            if any(s["name"] == tag for s in await self._list(definition, running)):
                raise InvalidInput(
                    "snapshot", f"VM {name} already has a snapshot {tag!r}; delete it or use another name"
                )
            loop = asyncio.get_running_loop()
            began = loop.time()
            if not running:
                await self._qemu_img_snapshot("-c", tag, definition)
                how = "qemu-img snapshot"
            elif with_memory:
                arguments = {"tag": tag, "vmstate": DISK_NODE, "devices": [DISK_NODE]}
                await self._job(definition.name, "snapshot-save", arguments, progress)
                how = "QMP snapshot-save (RAM and device state included)"
            else:
                async with self.vms.qmp(definition.name) as qmp:
                    await qmp.execute("blockdev-snapshot-internal-sync", {"device": DISK_NODE, "name": tag})
                how = "QMP blockdev-snapshot-internal-sync (disk only)"
            saved = next((s for s in await self._list(definition, running) if s["name"] == tag), None)
        return {
            "snapshot": tag,
            "memory": with_memory,
            "made_by": how,
            "seconds": round(loop.time() - began, 3),
            "saved": saved,
        }

    async def snapshot_revert(self, name: str, snapshot: str, progress: Progress | None = None) -> dict[str, Any]:
        """Go back to ``snapshot``: a stopped VM's disk with qemu-img; a running VM to a snapshot with memory with
        ``snapshot-load`` (it goes on from the saved moment).

        :raise VMStateError: a running VM and a disk-only snapshot (stop it first).
        """
        tag = validate_snapshot_name(snapshot)
        async with self.vms.lock(validate_name(name)) as lock:
            definition = await self.vms.load_locked(name, lock)
            self._snapshot_disk(definition)
            running = (await self.vms.state_of(definition)).status == "running"
            found = self._find(await self._list(definition, running), tag, name)
            loop = asyncio.get_running_loop()
            began = loop.time()
            if not running:
                await self._qemu_img_snapshot("-a", tag, definition)
                how = "qemu-img snapshot -a"
            elif found["memory_bytes"] > 0:
                arguments = {"tag": tag, "vmstate": DISK_NODE, "devices": [DISK_NODE]}
                await self._job(definition.name, "snapshot-load", arguments, progress)
                how = "QMP snapshot-load (the guest goes on from the saved moment)"
            else:
                raise VMStateError(
                    f"snapshot {tag!r} of VM {name} holds the disk only: a running guest cannot go back to it; "
                    "stop the VM first, then revert"
                )
            done: dict[str, Any] = {
                "snapshot": tag, "reverted_by": how, "seconds": round(loop.time() - began, 3), "running": running,
            }  # fmt: skip
            # A snapshot taken before modify grew the disk brings back the size the disk had then.
            _, size = await self.disk_snapshots(definition, running)
            if size is not None and size != definition.disk.size_bytes:
                disk = DiskDefinition(**{**definition.disk.__dict__, "size_bytes": size})
                await self.vms.store.save(definition.evolve(disk=disk))
                done["note"] = (
                    f"the disk has the size it had at the snapshot: {format_size(size)} "
                    f"(it was {format_size(definition.disk.size_bytes)})"
                )
        return done

    async def snapshot_delete(self, name: str, snapshot: str, progress: Progress | None = None) -> dict[str, Any]:
        tag = validate_snapshot_name(snapshot)
        async with self.vms.lock(validate_name(name)) as lock:
            definition = await self.vms.load_locked(name, lock)
            self._snapshot_disk(definition)
            running = (await self.vms.state_of(definition)).status == "running"
            self._find(await self._list(definition, running), tag, name)
            if running:
                await self._job(definition.name, "snapshot-delete", {"tag": tag, "devices": [DISK_NODE]}, progress)
                how = "QMP snapshot-delete"
            else:
                await self._qemu_img_snapshot("-d", tag, definition)
                how = "qemu-img snapshot -d"
        return {"snapshot": tag, "deleted_by": how}

    async def _qemu_img_snapshot(self, flag: str, tag: str, definition: VMDefinition) -> None:
        # qemu-img snapshot has no -f: --image-opts names the format, so that nothing is probed.
        opts = f"driver=qcow2,file.driver=file,file.filename={definition.disk.path}"
        await self.disks.qemu_img("snapshot", "-q", flag, tag, "--image-opts", opts)

    @staticmethod
    def _find(snapshots: list[dict[str, Any]], tag: str, name: str) -> dict[str, Any]:
        for found in snapshots:
            if found["name"] == tag:
                return found
        known = ", ".join(s["name"] for s in snapshots) or "none"
        raise InvalidInput("snapshot", f"VM {name} has no snapshot {tag!r} (it has: {known})")

    async def _job(self, name: str, command: str, arguments: dict[str, Any], progress: Progress | None) -> None:
        """Run a QMP job to its end: progress reported, bounded by ``--snapshot-timeout``, dismissed always.

        :raise QemuError: the job failed (QEMU's words) or did not end in time (it was cancelled).
        """
        job_id = f"qmh-{command}-{secrets.token_hex(4)}"
        limit = self.vms.settings.snapshot_timeout
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with self.vms.qmp(name) as qmp:
            await qmp.execute(command, {"job-id": job_id, **arguments})
            try:
                if progress is not None:
                    await progress(0.0, f"{command}: started")
                delay, next_report = 0.02, began
                while True:
                    job = await _job_state(qmp, job_id)
                    if job is None or job.get("status") in ("concluded", "null"):
                        break
                    now = loop.time()
                    if progress is not None and now >= next_report:
                        current, total = job.get("current-progress", 0), job.get("total-progress", 0)
                        await progress(now - began, f"{command}: {job.get('status')} {current}/{total}")
                        next_report = now + 1.0
                    if now - began > limit:
                        await _quietly(qmp, "job-cancel", {"id": job_id})
                        raise QemuError(f"{command} of VM {name} did not end within {limit:g} s; it was cancelled")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                if job is not None and job.get("error"):
                    raise QemuError(f"{command} of VM {name} failed; QEMU says: {str(job['error'])[:500]}")
            finally:
                await _quietly(qmp, "job-dismiss", {"id": job_id})

    async def disk_snapshots(self, definition: VMDefinition, running: bool) -> tuple[list[dict[str, Any]], int | None]:
        """The snapshots of a VM's qcow2 disk and its virtual size: QMP ``query-block`` while it runs (QEMU holds
        the image), ``qemu-img info`` of the one file when stopped (its format named, nothing probed)."""
        if running:
            async with self.vms.qmp(definition.name) as qmp:
                blocks = await qmp.execute("query-block")
            image: Any = next(
                (
                    b.get("inserted", {}).get("image", {})
                    for b in blocks
                    if isinstance(b, dict) and b.get("inserted", {}).get("node-name") == DISK_NODE
                ),
                {},
            )
        else:
            result = await self.disks.qemu_img("info", "--output=json", "-f", "qcow2", definition.disk.path)
            try:
                image = json.loads(result.stdout)
            except ValueError as exc:
                raise QemuError(f"qemu-img info {definition.disk.path}: unreadable output") from exc
        if not isinstance(image, dict):
            return [], None
        raw = image.get("snapshots", [])
        size = image.get("virtual-size")
        snapshots = [_snapshot_facts(s) for s in raw if isinstance(s, dict)] if isinstance(raw, list) else []
        return snapshots, size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


async def _job_state(qmp: QMPSession, job_id: str) -> dict[str, Any] | None:
    jobs = await qmp.execute("query-jobs")
    return next((j for j in jobs if isinstance(j, dict) and j.get("id") == job_id), None)


async def _quietly(qmp: QMPSession, command: str, arguments: dict[str, Any]) -> None:
    with contextlib.suppress(QMPFailure, OperationTimeout):  # no such job any more: nothing to do
        await qmp.execute(command, arguments)


def validate_snapshot_name(name: object) -> str:
    """:raise InvalidInput: not a name VM names may be (they reach qemu-img and QMP as they are)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            "snapshot",
            f"{name!r} is not allowed; use 1-63 characters from A-Z a-z 0-9 . _ - starting with a letter or digit",
        )
    return name


def _default_name() -> str:
    return "snap-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")


def _snapshot_facts(raw: dict[str, Any]) -> dict[str, Any]:
    """One snapshot as qemu-img info and query-block describe it (the same fields)."""

    def number(key: str) -> int:
        value = raw.get(key, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    date = dt.datetime.fromtimestamp(number("date-sec"), dt.UTC).isoformat().replace("+00:00", "Z")
    clock = number("vm-clock-sec") + number("vm-clock-nsec") / 1e9
    return {
        "name": str(raw.get("name", ""))[:64],
        "id": str(raw.get("id", ""))[:16],
        "date": date,
        "vm_clock_seconds": round(clock, 3) if math.isfinite(clock) else 0,
        "memory_bytes": number("vm-state-size"),
        "memory": format_size(number("vm-state-size")) if number("vm-state-size") else "0",
    }
