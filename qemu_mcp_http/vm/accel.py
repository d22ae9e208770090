"""Choosing the accelerator: KVM only when a probe shows it really runs guest code well.

``/dev/kvm`` may exist, open, and make ``query-kvm`` say enabled while guests
crawl or hang under it (nested virtualization).  So ``auto`` runs a tiny
guest, once per host and arch, under KVM and under TCG: a boot sector that
enters long mode with paging (x86_64), or a bare EL1 program that ends with
PSCI SYSTEM_OFF (arm64), prints a marker and exits.  KVM is chosen only when
it completes, and is not slower than TCG on the same work.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass

from ..config import Settings
from ..errors import OperationTimeout, QemuMcpError
from ..hosts.base import Host

__all__ = ["AccelChoice", "AccelProbe", "kvm_verdict"]

log = logging.getLogger(__name__)

MARKER = "QMCP-KVM-PROBE-OK"

#: Assembled from kvm_probe_x86.S (512-byte MBR boot sector, trailing zeros stripped).
_X86_BOOT_SECTOR = base64.b64decode(
    "+jHAjtiOwI7QvAB8vwAQZjHAuQAMZvOrZscGABADIAAAZscGACADMAAAZscGADCDAAAAZg8BFsh8DyDgZoPIIA8i4Ga4ABAA"
    "AA8i2Ga5gAAAwA8yZg0AAQAADzAPIMBmDQEAAIAPIsBm6nB8AAAIAEgxwEjHwUBCDwBIAcji+2a6AgRIjTUTAAAASMfBEwAA"
    "APNuZrr0ALAQ7vTr/QpRTUNQLUtWTS1QUk9CRS1PSwoAAAAAAAAAAAAAAAAAmiAAAAAAAACSAAAXALB8AAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAVao="
)
#: Hand-encoded AArch64: write MARKER to the virt PL011 at 0x09000000, then PSCI SYSTEM_OFF via HVC.
_ARM64_PROGRAM = base64.b64decode(
    "ASCh0kIBgFIiAAA5IgqAUiIAADmiCYBSIgAAOWIIgFIiAAA5AgqAUiIAADmiBYBSIgAAOWIJgFIiAAA5wgqAUiIAADmiCYBS"
    "IgAAOaIFgFIiAAA5AgqAUiIAADlCCoBSIgAAOeIJgFIiAAA5QgiAUiIAADmiCIBSIgAAOaIFgFIiAAA54gmAUiIAADliCYBS"
    "IgAAOUIBgFIiAAA5AAGAUgCAsHICAADUAAAAFA=="
)

_HOST_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}


def x86_probe_image() -> bytes:
    """The boot sector padded back to 512 bytes with its 0x55AA signature."""
    body = _X86_BOOT_SECTOR[:-2]
    return body + bytes(510 - len(body)) + b"\x55\xaa"


def arm64_probe_image() -> bytes:
    return _ARM64_PROGRAM


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str


def kvm_verdict(kvm_seconds: float | None, tcg_seconds: float | None) -> bool:
    """KVM is trusted when its probe finished and took no longer than twice TCG's (1 s floor for startup)."""
    if kvm_seconds is None:
        return False
    return kvm_seconds <= max(1.0, 2 * (tcg_seconds or 0.0))


class AccelProbe:
    """Caches the accelerator decision per (host, guest arch) for the server's life."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], AccelChoice] = {}
        self._lock = asyncio.Lock()

    def known(self) -> dict[str, str]:
        return {f"{h}/{a}": f"{c.accel} ({c.reason})" for (h, a), c in self._cache.items()}

    async def choose(self, host: Host, arch: str, settings: Settings, scratch_dir: str) -> AccelChoice:
        key = (host.name, arch)
        async with self._lock:
            if key not in self._cache:
                choice = await self._probe(host, arch, settings, scratch_dir)
                level = logging.INFO if choice.accel == "kvm" else logging.WARNING
                log.log(
                    level,
                    "accelerator for %s guests on %s: %s (%s)",
                    arch,
                    host.name,
                    choice.accel,
                    choice.reason,
                )
                self._cache[key] = choice
            return self._cache[key]

    async def _probe(self, host: Host, arch: str, settings: Settings, scratch_dir: str) -> AccelChoice:
        uname = await host.run(["uname", "-m"], timeout=settings.command_timeout)
        host_arch = _HOST_ARCH.get(uname.stdout.strip(), uname.stdout.strip())
        if host_arch != arch:
            return AccelChoice("tcg", f"guest arch {arch} differs from host arch {host_arch}")
        if not (
            await host.run(
                ["test", "-w", "/dev/kvm"],
                timeout=settings.command_timeout,
                check=False,
            )
        ).succeeded:
            return AccelChoice("tcg", "/dev/kvm is missing or not writable for this user")
        image = f"{scratch_dir}/.kvm-probe-{arch}.bin"
        data = x86_probe_image() if arch == "x86_64" else arm64_probe_image()
        await host.write_file(image, data, timeout=settings.command_timeout)
        try:
            tcg = await self._run_probe(host, arch, "tcg", image, settings.kvm_probe_timeout)
            kvm = await self._run_probe(host, arch, "kvm", image, settings.kvm_probe_timeout)
        finally:
            await host.run(["rm", "-f", "--", image], timeout=settings.command_timeout, check=False)
        if kvm is None:
            return AccelChoice(
                "tcg",
                f"a probe guest did not finish under KVM within {settings.kvm_probe_timeout:g} s",
            )
        if not kvm_verdict(kvm, tcg):
            return AccelChoice(
                "tcg",
                f"KVM ran the probe guest in {kvm:.2f} s vs {tcg or 0:.2f} s under TCG (nested KVM?)",
            )
        return AccelChoice("kvm", f"probe guest ran under KVM in {kvm:.2f} s")

    async def _run_probe(self, host: Host, arch: str, accel: str, image: str, timeout: float) -> float | None:
        argv = probe_argv(arch, accel, image)
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            result = await host.run(argv, timeout=timeout, check=False)
        except OperationTimeout:
            return None
        except QemuMcpError as exc:
            log.info("%s probe on %s failed: %s", accel, host.name, exc)
            return None
        return loop.time() - began if MARKER in result.stdout else None


def probe_argv(arch: str, accel: str, image: str) -> list[str]:
    if arch == "x86_64":
        return [
            "qemu-system-x86_64", "-accel", accel, "-M", "pc", "-nodefaults", "-no-user-config",
            "-display", "none", "-m", "16", "-drive", f"file={image},format=raw,if=ide",
            "-chardev", "stdio,id=dbg", "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]  # fmt: skip
    return [
        "qemu-system-aarch64", "-accel", accel, "-M", "virt", "-cpu", "host" if accel == "kvm" else "cortex-a57",
        "-nodefaults", "-no-user-config", "-display", "none", "-m", "64", "-kernel", image, "-serial", "stdio",
    ]  # fmt: skip
