"""The QEMU command line built from a definition."""

from __future__ import annotations

from qemu_mcp_http.vm.argv import qemu_argv
from qemu_mcp_http.vm.paths import VMPaths
from qemu_mcp_http.vm.spec import DiskDefinition, VMDefinition


def definition(arch: str = "x86_64", iso: str | None = "/iso/a.iso", fmt: str = "qcow2") -> VMDefinition:
    return VMDefinition(
        name="web-1",
        arch=arch,  # type: ignore[arg-type]
        memory_mib=2048,
        vcpus=2,
        disk=DiskDefinition("/vms/web-1/web-1.qcow2", fmt, 1 << 30, True),  # type: ignore[arg-type]
        iso=iso,
        uuid="2c1d7f5e-2a43-4c47-9a5c-7e0b0b5d3f11",
        mac="52:54:00:12:34:56",
        created_at="2026-11-25T00:00:00Z",
        machine="q35" if arch == "x86_64" else "virt",
    )


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_x86_argv() -> None:
    paths = VMPaths("/vms", "web-1")
    argv = qemu_argv(definition(), paths, "tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-machine") == ["q35"]
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-m") == ["2048M"]
    assert option(argv, "-smp") == ["2"]
    assert "file=/vms/web-1/web-1.qcow2,if=none,id=disk0,format=qcow2,node-name=disk0-fmt" in option(argv, "-drive")
    assert "ide-cd,drive=cd0,id=cdrom0,bootindex=2" in option(argv, "-device")
    assert option(argv, "-qmp") == ["unix:/vms/web-1/qmp.sock,server=on,wait=off"]
    assert option(argv, "-pidfile") == ["/vms/web-1/qemu.pid"]
    assert "-daemonize" in argv
    assert "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:12:34:56" in option(argv, "-device")


def test_arm64_argv_uses_uefi_and_scsi_cd() -> None:
    argv = qemu_argv(definition("arm64"), VMPaths("/vms", "web-1"), "tcg")
    assert argv[0] == "qemu-system-aarch64"
    assert option(argv, "-cpu") == ["cortex-a57"]
    drives = option(argv, "-drive")
    assert drives[0].startswith("if=pflash,format=raw,readonly=on,file=")
    assert drives[1] == "if=pflash,format=raw,file=/vms/web-1/efivars.fd"
    assert "scsi-cd,drive=cd0,bus=scsi0.0,id=cdrom0,bootindex=2" in option(argv, "-device")


def test_no_iso_no_cdrom() -> None:
    argv = qemu_argv(definition(iso=None, fmt="raw"), VMPaths("/vms", "web-1"), "kvm")
    assert not any("cd0" in a for a in argv)
    assert any("format=raw" in a for a in option(argv, "-drive"))


def test_no_user_value_is_an_argv_element_of_its_own() -> None:
    # Every user-controlled value sits after '=' inside an option value.
    argv = qemu_argv(definition(), VMPaths("/vms", "web-1"), "tcg")
    assert "/iso/a.iso" not in argv and "/vms/web-1/web-1.qcow2" not in argv
    assert all(not a.startswith("-") or a[1:].replace("-", "").isalnum() for a in argv)
