"""The VM layer's branches on a host in memory (tests/fakehost.py): milliseconds each, no QEMU.

The real-QEMU tests stay; these add the branches that are slow or awkward to reach for real.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from qemu_mcp_http.errors import InvalidInput, QemuError, VMNotFound
from qemu_mcp_http.vm import store
from qemu_mcp_http.vm.manager import VMManager

from .fakehost import QUICK, VM_DIR, FakeHost, FakeImage


@pytest.fixture
def host(fake_host: FakeHost) -> FakeHost:
    return fake_host


@pytest.fixture
def vms(fake_vms: VMManager) -> VMManager:
    return fake_vms


def definition(host: FakeHost, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(host.files[f"{VM_DIR}/{name}/vm.json"])
    return data


async def test_create_records_the_disk_it_made(vms: VMManager, host: FakeHost) -> None:
    """A new disk is made beside a temporary name, linked into place, and its identity recorded."""
    await vms.create("web", "x86_64", "512M", 1, None, None)
    disk = definition(host, "web")["disk"]
    assert (
        disk["created_by_tool"] and disk["identity"] == (await host.file_ids([disk["path"]], timeout=1))[disk["path"]]
    )
    assert [a[0] for a in host.argvs[:4]] == ["mkdir", "mkdir", "qemu-img", "ln"]
    assert not any(".creating" in p for p in host.files) and f"{VM_DIR}/web/.create.json" not in host.files


async def test_create_undoes_everything_on_failure(vms: VMManager, host: FakeHost) -> None:
    """arm64 needs the UEFI variables: when copying them fails, the disk made and the directory go too."""
    host.fail(lambda argv: argv[0] == "cp", "cp: cannot stat: No such file")
    with pytest.raises(Exception, match="cp failed"):
        await vms.create("arm", "arm64", "256M", 1, "path=/data/arm.qcow2,size=1G", None)
    assert "/data/arm.qcow2" not in host.files
    assert f"{VM_DIR}/arm" not in host.dirs
    assert not any(p.startswith(f"{VM_DIR}/arm") for p in host.files)


async def test_create_refuses_a_disk_inside_another_vm(vms: VMManager, host: FakeHost) -> None:
    await vms.create("a", "x86_64", "256M", 1, None, None)
    with pytest.raises(InvalidInput, match="directory of a VM"):
        await vms.create("b", "x86_64", "256M", 1, f"path={VM_DIR}/a/b.qcow2,size=1G", None)
    assert f"{VM_DIR}/b" not in host.dirs


async def test_stop_escalates_acpi_quit_sigkill(vms: VMManager, host: FakeHost) -> None:
    await vms.create("s", "x86_64", "256M", 1, None, None)
    outcomes = []
    for acpi, quits in (("obey", True), ("ignore", True), ("ignore", False)):
        host.acpi, host.obeys_quit = acpi, quits  # type: ignore[assignment]
        await vms.start("s")
        _, details = await vms.stop("s", QUICK)
        outcomes.append(details["stopped_by"])
    assert outcomes == ["acpi", "quit", "sigkill"]
    assert host.commands("kill")[-1][:2] == ["kill", "-KILL"]
    assert (await vms.stop("s", QUICK))[1]["stopped_by"] == "already-stopped"


async def test_modify_restarts_a_running_vm_with_the_new_memory(vms: VMManager, host: FakeHost) -> None:
    host.acpi = "obey"
    await vms.create("m", "x86_64", "256M", 1, None, None)
    await vms.start("m")
    message, details = await vms.modify("m", "512M", None, None, QUICK)
    assert details["restarted"] is True and details["stopped_by"] == "acpi" and "restarted" in message
    running = [vm for vm in host.vms.values() if vm.alive]
    assert [vm.memory for vm in running] == ["512M"]
    assert definition(host, "m")["memory_mib"] == 512


async def test_modify_that_qemu_refuses_is_rolled_back(vms: VMManager, host: FakeHost) -> None:
    host.acpi, host.max_memory_mib = "obey", 1024
    await vms.create("r", "x86_64", "256M", 1, None, None)
    await vms.start("r")
    with pytest.raises(QemuError, match="restored and the VM started again") as failure:
        await vms.modify("r", "200G", None, None, QUICK)
    assert failure.value.details is not None and failure.value.details["rolled_back"] is True
    assert definition(host, "r")["memory_mib"] == 256
    assert [vm.memory for vm in host.vms.values() if vm.alive] == ["256M"]


async def test_disk_grows_live_or_with_qemu_img(vms: VMManager, host: FakeHost) -> None:
    await vms.create("g", "x86_64", "256M", 1, "size=1G", None)
    _, stopped = await vms.modify("g", None, None, "size=2G", QUICK)
    assert stopped["disk_resized_by"] == "qemu-img resize"
    assert host.commands("qemu-img")[-1][:2] == ["qemu-img", "resize"]
    await vms.start("g")
    _, live = await vms.modify("g", None, None, "size=3G", QUICK)
    assert live["disk_resized_by"] == "QMP block_resize" and live["restarted"] is False
    vm = next(vm for vm in host.vms.values() if vm.alive)
    assert ("block_resize", {"node-name": "disk0-fmt", "size": 3 << 30}) in vm.commands
    with pytest.raises(InvalidInput, match="shrinking is refused"):
        await vms.modify("g", None, None, "size=1G", QUICK)


async def test_delete_keeps_what_it_did_not_make(vms: VMManager, host: FakeHost) -> None:
    host.put("/data/mine.qcow2", b"image", FakeImage("qcow2", 1 << 30))
    await vms.create("k", "x86_64", "256M", 1, "path=/data/mine.qcow2", None)
    host.put(f"{VM_DIR}/k/notes.txt", b"user's")
    details = await vms.delete("k", QUICK)
    assert details["kept"] == ["/data/mine.qcow2", f"{VM_DIR}/k/notes.txt"]
    assert "/data/mine.qcow2" in host.files and f"{VM_DIR}/k/notes.txt" in host.files
    assert f"{VM_DIR}/k/vm.json" not in host.files


async def test_delete_removes_the_disk_only_while_it_is_the_same_file(vms: VMManager, host: FakeHost) -> None:
    await vms.create("d", "x86_64", "256M", 1, "path=/data/d.qcow2,size=1G", None)
    host.put("/data/d.qcow2", b"another file now", FakeImage("qcow2", 1 << 30))  # a new inode under the name
    details = await vms.delete("d", QUICK)
    assert "/data/d.qcow2" in host.files and details["kept"] == ["/data/d.qcow2"]
    await vms.create("e", "x86_64", "256M", 1, "path=/data/e.qcow2,size=1G", None)
    details = await vms.delete("e", QUICK)
    assert "/data/e.qcow2" not in host.files and details["removed"] == ["/data/e.qcow2", f"{VM_DIR}/e"]


async def test_unknown_vm(vms: VMManager) -> None:
    for call in (vms.start("ghost"), vms.stop("ghost", QUICK), vms.delete("ghost", QUICK)):
        with pytest.raises(VMNotFound):
            await call


async def test_only_ordinary_definitions_are_kept_decoded(vms: VMManager, host: FakeHost) -> None:
    """A definition of an ordinary size is decoded once and then found in the cache; one padded towards the read
    limit (valid JSON all the same: a hostile host can write that) is decoded every time and never kept."""
    await vms.create("small", "x86_64", "512M", 1, None, None)
    await vms.create("padded", "x86_64", "512M", 1, None, None)
    raw = host.files[f"{VM_DIR}/padded/vm.json"]
    host.put(f"{VM_DIR}/padded/vm.json", b"{" + b" " * store.MAX_CACHED_DEFINITION_BYTES + raw.lstrip()[1:])
    store._decode_cached.cache_clear()
    for _ in range(3):
        listed, _problems = await vms.list()
        assert sorted(d.name for d, _ in listed) == ["padded", "small"]
    info = store._decode_cached.cache_info()
    assert (info.currsize, info.misses, info.hits) == (1, 1, 2), info
