"""storage/ (disk images and their inspection, snapshots) on a host in memory (tests/fakehost.py): the branches in
milliseconds. The real-QEMU tests (test_snapshot.py, test_hardening.py, test_guest_access.py) stay.
"""

from __future__ import annotations

from typing import Any

import pytest

from qemu_mcp_http.errors import InvalidInput, QemuError, VMStateError
from qemu_mcp_http.storage.disks import DiskImages
from qemu_mcp_http.vm.fence import Fence, FenceRules
from qemu_mcp_http.vm.manager import VMManager

from .fakehost import FakeHost, FakeImage


async def test_a_stopped_vm_s_snapshots_are_made_with_qemu_img(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """create, list, revert, delete of a stopped VM: qemu-img with --image-opts (nothing probed)."""
    await fake_vms.create("s", "x86_64", "256M", 1, "size=1G", None)
    made = await fake_vms.snapshot_create("s", "before", None)
    assert (made["memory"], made["made_by"]) == (False, "qemu-img snapshot")
    assert made["saved"]["name"] == "before" and made["saved"]["memory"] == "0"
    assert [s["name"] for s in await fake_vms.snapshot_list("s")] == ["before"]
    assert (await fake_vms.snapshot_revert("s", "before"))["reverted_by"] == "qemu-img snapshot -a"
    assert (await fake_vms.snapshot_delete("s", "before"))["deleted_by"] == "qemu-img snapshot -d"
    assert await fake_vms.snapshot_list("s") == []
    snapshot_argvs = [argv for argv in fake_host.commands("qemu-img") if argv[1] == "snapshot"]
    assert all("--image-opts" in argv and "-f" not in argv for argv in snapshot_argvs)


async def test_snapshot_names_and_memory_are_checked(fake_vms: VMManager) -> None:
    await fake_vms.create("n", "x86_64", "256M", 1, None, None)
    await fake_vms.snapshot_create("n", "one", None)
    with pytest.raises(InvalidInput, match="already has a snapshot 'one'"):
        await fake_vms.snapshot_create("n", "one", None)
    with pytest.raises(InvalidInput, match="is stopped: it has no memory to save"):
        await fake_vms.snapshot_create("n", "two", True)
    with pytest.raises(InvalidInput, match=r"has no snapshot 'ghost' \(it has: one\)"):
        await fake_vms.snapshot_revert("n", "ghost")
    with pytest.raises(InvalidInput, match="'snapshot'"):
        await fake_vms.snapshot_create("n", "-rf", None)


async def test_a_running_vm_s_snapshots_are_qmp_jobs(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """With memory: snapshot-save / snapshot-load jobs, dismissed after; disk only: the internal sync, whose
    snapshot a running guest cannot go back to."""
    await fake_vms.create("r", "x86_64", "256M", 1, None, None)
    await fake_vms.start("r")
    progress: list[str] = []

    async def report(elapsed: float, phase: str) -> None:
        progress.append(phase)

    with_memory = await fake_vms.snapshot_create("r", "full", None, report)
    assert with_memory["memory"] is True and with_memory["saved"]["memory_bytes"] == 64 << 20
    disk_only = await fake_vms.snapshot_create("r", "disk", False)
    assert disk_only["made_by"] == "QMP blockdev-snapshot-internal-sync (disk only)"
    reverted = await fake_vms.snapshot_revert("r", "full", report)
    assert reverted["reverted_by"].startswith("QMP snapshot-load") and reverted["running"] is True
    with pytest.raises(VMStateError, match="holds the disk only"):
        await fake_vms.snapshot_revert("r", "disk")
    vm = fake_host.running()
    assert [c for c, _ in vm.commands if c.startswith("snapshot-")] == ["snapshot-save", "snapshot-load"]
    assert vm.jobs == [] and progress[0] == "snapshot-save: started"


async def test_a_failed_job_says_what_qemu_said(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """A job that concludes with an error fails the call with QEMU's words, and is dismissed all the same."""
    await fake_vms.create("f", "x86_64", "256M", 1, None, None)
    await fake_vms.start("f")
    await fake_vms.snapshot_create("f", "one", True)
    vm = fake_host.running()

    def failing(arguments: dict[str, Any]) -> dict[str, Any]:
        vm.jobs.append({"id": arguments["job-id"], "status": "concluded", "error": "Device 'disk0' is read-only"})
        return {}

    vm.answers["snapshot-delete"] = failing
    with pytest.raises(QemuError, match="QEMU says: Device 'disk0' is read-only"):
        await fake_vms.snapshot_delete("f", "one")
    assert vm.jobs == [] and [s["name"] for s in await fake_vms.snapshot_list("f")] == ["one"]


async def test_only_a_qcow2_disk_the_server_made_takes_snapshots(fake_vms: VMManager, fake_host: FakeHost) -> None:
    fake_host.put("/data/raw.img", b"raw", FakeImage("raw", 1 << 30))
    fake_host.put("/data/theirs.qcow2", b"image", FakeImage("qcow2", 1 << 30))
    await fake_vms.create("raw", "x86_64", "256M", 1, "path=/data/raw.img", None)
    await fake_vms.create("att", "x86_64", "256M", 1, "path=/data/theirs.qcow2", None)
    with pytest.raises(VMStateError, match="raw disk, which cannot hold snapshots"):
        await fake_vms.snapshot_list("raw")
    with pytest.raises(VMStateError, match="was attached, not made by this server"):
        await fake_vms.snapshot_create("att", None, None)


@pytest.fixture
def disks(fake_host: FakeHost) -> DiskImages:
    return DiskImages(fake_host, Fence(fake_host, FenceRules(roots=("/data",)), 5.0), 5.0)


async def test_a_chain_is_inspected_one_file_at_a_time(disks: DiskImages, fake_host: FakeHost) -> None:
    """An overlay and its base: each file asked about alone, with the format the layer above recorded."""
    fake_host.put("/data/base.qcow2", b"image", FakeImage("qcow2", 2 << 30))
    fake_host.put("/data/top.qcow2", b"image", FakeImage("qcow2", 4 << 30, "base.qcow2", "qcow2"))
    layers = await disks.inspect("/data/top.qcow2", "qcow2", own_dir=None)
    assert [(layer.path, layer.format, layer.virtual_size) for layer in layers] == [
        ("/data/top.qcow2", "qcow2", 4 << 30),
        ("/data/base.qcow2", "qcow2", 2 << 30),
    ]
    infos = [argv for argv in fake_host.commands("qemu-img") if argv[1] == "info"]
    assert [argv[-1] for argv in infos] == ["/data/top.qcow2", "/data/base.qcow2"] and all("-f" in a for a in infos)


@pytest.mark.parametrize(
    ("image", "why"),
    [
        (FakeImage("qcow2", 1 << 30, "base.raw", None), "does not record the format of its backing file"),
        (FakeImage("qcow2", 1 << 30, "/etc/shadow", "raw"), "outside"),
        (FakeImage("qcow2", 1 << 30, "nbd:evil:10809", "raw"), "not a plain path"),
        (FakeImage("vmdk", 1 << 30), "only qcow2 and raw"),
    ],
)
async def test_an_unsafe_chain_is_refused(disks: DiskImages, fake_host: FakeHost, image: FakeImage, why: str) -> None:
    fake_host.put("/data/disk.img", b"image", image)
    with pytest.raises(InvalidInput, match=why):
        await disks.inspect("/data/disk.img", None, own_dir=None)


async def test_a_recorded_format_must_be_the_file_s(disks: DiskImages, fake_host: FakeHost) -> None:
    fake_host.put("/data/disk.img", b"raw", FakeImage("raw", 1 << 30))
    with pytest.raises(InvalidInput, match="cannot be opened as qcow2"):
        await disks.inspect("/data/disk.img", "qcow2", own_dir=None)
