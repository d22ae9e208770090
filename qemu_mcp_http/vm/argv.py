"""The QEMU command line of a VM: a pure function of its definition."""

from __future__ import annotations

from dataclasses import dataclass

from .paths import VMPaths
from .spec import VMDefinition

__all__ = ["ARM64_FIRMWARE", "FirmwarePaths", "qemu_argv", "qemu_binary"]


@dataclass(frozen=True)
class FirmwarePaths:
    code: str
    vars_template: str


#: UEFI for arm64 guests, from Debian's qemu-efi-aarch64 package.
ARM64_FIRMWARE = FirmwarePaths(
    code="/usr/share/AAVMF/AAVMF_CODE.fd",
    vars_template="/usr/share/AAVMF/AAVMF_VARS.fd",
)

_BINARIES = {"x86_64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}


def qemu_binary(arch: str) -> str:
    return _BINARIES[arch]


def qemu_argv(
    definition: VMDefinition,
    paths: VMPaths,
    accel: str,
    firmware: FirmwarePaths = ARM64_FIRMWARE,
    *,
    forward_address: str = "127.0.0.1",
) -> list[str]:
    """Argv that starts ``definition`` daemonized, with QMP, pid file and serial log under ``paths``.

    Every user-supplied value sits after ``=`` inside an option value, never as
    an argv element of its own, so none can be taken for an option; paths were
    validated to hold no commas (they would split QEMU's option strings).
    """
    d = definition
    argv = [qemu_binary(d.arch), "-name", f"guest={d.name},process=qemu-{d.name}"]
    argv += _machine(d, accel)
    argv += _disks(d, paths, firmware)
    argv += _network(d, forward_address)
    argv += _channels(d, paths)
    return argv


def _machine(d: VMDefinition, accel: str) -> list[str]:
    """Machine, CPU, accelerator, memory, vCPUs, identity; nothing QEMU would add by default."""
    argv = ["-machine", d.machine]
    if d.arch == "arm64":
        argv += ["-cpu", "cortex-a57" if accel == "tcg" else "host"]
    return [
        *argv,
        "-accel", accel,
        "-m", f"{d.memory_mib}M",
        "-smp", str(d.vcpus),
        "-uuid", d.uuid,
        "-nodefaults",
        "-no-user-config",
    ]  # fmt: skip


def _disks(d: VMDefinition, paths: VMPaths, firmware: FirmwarePaths) -> list[str]:
    """The UEFI flash (arm64), the disk, the ISO and the cloud-init seed: every one with its format named."""
    argv: list[str] = []
    if d.arch == "arm64":
        argv += [
            "-drive", f"if=pflash,format=raw,readonly=on,file={firmware.code}",
            "-drive", f"if=pflash,format=raw,file={paths.efi_vars}",
        ]  # fmt: skip
    argv += [
        "-drive", f"file={d.disk.path},if=none,id=disk0,format={d.disk.format},node-name=disk0-fmt",
        "-device", "virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=1",
    ]  # fmt: skip
    if d.iso:
        if d.arch == "x86_64":
            cd_device = ["-device", "ide-cd,drive=cd0,id=cdrom0,bootindex=2"]
        else:
            cd_device = [
                "-device", "virtio-scsi-pci,id=scsi0",
                "-device", "scsi-cd,drive=cd0,bus=scsi0.0,id=cdrom0,bootindex=2",
            ]  # fmt: skip
        argv += [
            "-drive",
            # An ISO is read as raw, never probed: a file with an image header must not become a qcow2.
            f"file={d.iso},if=none,id=cd0,media=cdrom,readonly=on,format=raw",
            *cd_device,
        ]
    if d.cloud_init is not None:
        # virtio-scsi: Debian's cloud kernel (linux-image-cloud-*) has no AHCI driver, so an IDE/AHCI CD-ROM
        # would be invisible to it and cloud-init would find no datasource.
        argv += [
            "-device", "virtio-scsi-pci,id=scsi-seed",
            "-drive", f"file={paths.seed},if=none,id=seed0,media=cdrom,readonly=on,format=raw",
            "-device", "scsi-cd,drive=seed0,bus=scsi-seed.0,id=seed-cd",
        ]  # fmt: skip
    return argv


def _channels(d: VMDefinition, paths: VMPaths) -> list[str]:
    """The balloon, and every way in: the guest agent, the serial console, the screen, QMP; daemonized."""
    return [
        "-device", "virtio-balloon-pci,id=balloon0",
        # Guest agent channel: network statistics come from qemu-guest-agent when the guest runs it.
        "-chardev", f"socket,id=qga0,path={paths.qga_socket},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vserial0",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        # The serial console: a socket for input (one client at a time), every byte logged to console.log.
        "-chardev",
        f"socket,id=serial0,path={paths.console_socket},server=on,wait=off,logfile={paths.console_log},logappend=on",
        "-serial", "chardev:serial0",
        # A screen (screendump, VNC) that QEMU itself never shows: VNC only on a unix socket.
        "-device", "VGA,id=video0" if d.arch == "x86_64" else "virtio-gpu-pci,id=video0",
        "-display", "none",
        "-vnc", f"unix:{paths.vnc_socket}",
        "-qmp", f"unix:{paths.qmp_socket},server=on,wait=off",
        "-pidfile", paths.pidfile,
        "-daemonize",
    ]  # fmt: skip


def _network(d: VMDefinition, forward_address: str) -> list[str]:
    """The NIC: user-mode networking with the port forwards, a bridge (QEMU's bridge helper), or none."""
    network = d.network_spec
    if network.mode == "none":
        return []
    if network.mode == "bridge":
        netdev = f"bridge,id=net0,br={network.bridge}"
    else:
        forwards = []
        for forward in d.forwards:
            host_port = d.host_port(forward)
            if host_port is None:
                raise ValueError(f"forward {forward.spec()} has no host port yet (start assigns one)")
            forwards.append(f",hostfwd={forward.hostfwd(forward_address, host_port)}")
        netdev = "user,id=net0" + "".join(forwards)
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=net0,id=nic0,mac={d.mac}"]
