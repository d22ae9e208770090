"""The bootable test guest: ISOs built from Debian packages by ``tests/guest/build.sh``, cached between runs.

The cache lives under ``$QEMU_MCP_GUEST_CACHE`` (default ``~/.cache/qemu-mcp-http/guest``), in a
directory named by the hash of the build inputs, so editing the guest rebuilds it and an unchanged
guest costs nothing.  An exclusive ``flock`` on that directory serializes builds of parallel runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .buildcache import build_directory, link_or_copy, locked, prune_stale

GUEST_SRC = Path(__file__).resolve().parent / "guest"
ARCHES = ("amd64", "arm64")
#: What the guest prints on its serial console once network, disk, acpid and the agent are up.
READY_MARKER = "QEMU-MCP-GUEST-READY"
#: A cold build of one ISO downloads a kernel (~60 MB for arm64); generous for a slow mirror.
BUILD_TIMEOUT = 600.0

__all__ = ["READY_MARKER", "GuestISOs", "build_guest_isos", "guest_isos", "wait_for_marker"]


@dataclass(frozen=True)
class GuestISOs:
    amd64: Path
    arm64: Path
    build_seconds: float
    #: amd64 with a GRUB menu that waits for a key (two entries): for the screen and keys tests.
    menu_amd64: Path

    def for_arch(self, arch: str) -> Path:
        return self.arm64 if arch in ("arm64", "aarch64") else self.amd64


def build_guest_isos(cache: Path | None = None) -> GuestISOs:
    """Build (or reuse) both ISOs; the two builds run in parallel.

    :raise RuntimeError: a build failed; the message holds its output.
    """
    directory = build_directory("QEMU_MCP_GUEST_CACHE", "guest", GUEST_SRC, cache)
    began = time.monotonic()
    with locked(directory):
        for leftover in directory.glob(".build-*"):  # of a build killed before its own cleanup ran
            shutil.rmtree(leftover, ignore_errors=True)
        isos = {arch: directory / f"guest-{arch}.iso" for arch in ARCHES}
        builds = {
            arch: subprocess.Popen(
                ["bash", str(GUEST_SRC / "build.sh"), arch, str(directory)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group, so that a timeout kills apt-get and dpkg-deb too
            )
            for arch, iso in isos.items()
            if not iso.exists() or (arch == "amd64" and not (directory / "guest-menu-amd64.iso").exists())
        }
        failures = []
        deadline = time.monotonic() + BUILD_TIMEOUT
        try:
            for arch, proc in builds.items():
                try:
                    output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    output, _ = proc.communicate()
                    output += f"\n(killed after {BUILD_TIMEOUT:g} s)".encode()
                if proc.returncode != 0:
                    failures.append(f"build.sh {arch} failed ({proc.returncode}):\n{output.decode(errors='replace')}")
        finally:
            for proc in builds.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if failures:
            raise RuntimeError("\n".join(failures))
    prune_stale(directory)
    return GuestISOs(
        amd64=isos["amd64"],
        arm64=isos["arm64"],
        build_seconds=round(time.monotonic() - began, 2),
        menu_amd64=directory / "guest-menu-amd64.iso",
    )


@pytest.fixture(scope="session")
def guest_isos(workdir: Path) -> GuestISOs:
    """Both guest ISOs, placed inside the session's workdir (the test server's only allowed root)."""
    try:
        built = build_guest_isos()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot build the test guest (scripts/setup.sh --test installs its tools): {exc}")
    target = workdir / "guest"
    target.mkdir(exist_ok=True)
    placed = {}
    for arch in ARCHES:
        placed[arch] = target / f"guest-{arch}.iso"
        link_or_copy(built.for_arch(arch), placed[arch])
    menu = link_or_copy(built.menu_amd64, target / "guest-menu-amd64.iso")
    return GuestISOs(amd64=placed["amd64"], arm64=placed["arm64"], build_seconds=built.build_seconds, menu_amd64=menu)


async def wait_for_marker(console_log: Path, timeout: float, marker: str = READY_MARKER) -> float:
    """Seconds until ``marker`` appears in the serial log.

    :raise AssertionError: it did not within ``timeout``; the message holds the log's tail.
    """
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if marker.encode() in console_log.read_bytes():
                return round(time.monotonic() - began, 2)
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.1)
    tail = console_log.read_bytes()[-2000:].decode(errors="replace") if console_log.exists() else "(no log)"
    raise AssertionError(f"{marker} not in {console_log} after {timeout:g} s; its end:\n{tail}")
