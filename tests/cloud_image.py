"""A real Debian 12 cloud image (qcow2) built from Debian packages by ``tests/cloudimg/build.sh``, cached.

The guest has systemd, cloud-init (NoCloud), openssh-server, qemu-guest-agent, sudo and GRUB for BIOS:
boot it with a NoCloud seed (volume label ``cidata``) on virtio-scsi and a virtio NIC, always on a qcow2
overlay backed by :attr:`CloudImage.path` (never write to the cached image itself).

The cache lives under ``$QEMU_MCP_CLOUDIMG_CACHE`` (default ``~/.cache/qemu-mcp-http/cloudimg``), in a
directory named by the hash of the files of tests/cloudimg, so editing the build rebuilds it and an
unchanged image costs nothing. An exclusive ``flock`` on that directory serializes builds of parallel
runs. The build needs root (debootstrap, chroot) and the apt packages of ``scripts/setup.sh --test``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .buildcache import build_directory, link_or_copy, locked, prune_stale

CLOUDIMG_SRC = Path(__file__).resolve().parent / "cloudimg"
IMAGE_NAME = "debian-12-cloud-amd64.qcow2"
#: A cold build (debootstrap downloads and installs ~600 MB) takes 2-4 minutes with a near mirror;
#: generous for a slow mirror or a loaded machine.
BUILD_TIMEOUT = 1800.0
#: On timeout the build's process group gets SIGTERM first, so that its trap unmounts what debootstrap
#: mounted in the tree and removes it, then SIGKILL after this long.
TERM_GRACE_S = 60.0

__all__ = ["IMAGE_NAME", "CloudImage", "build_cloud_image", "cloud_image"]


@dataclass(frozen=True)
class CloudImage:
    #: The cached qcow2 (2 GiB virtual, compressed). Shared between runs: use it as a backing file only.
    path: Path
    #: How long :func:`build_cloud_image` took (about 0 when cached).
    build_seconds: float

    def link_into(self, directory: Path) -> Path:
        """The image placed in ``directory`` (a hard link when possible, else a copy), e.g. a server's allowed root."""
        return link_or_copy(self.path, directory / self.path.name)


def build_cloud_image(cache: Path | None = None) -> CloudImage:
    """Build (or reuse) the image.

    :raise RuntimeError: the build failed or timed out; the message holds its output.
    """
    directory = build_directory("QEMU_MCP_CLOUDIMG_CACHE", "cloudimg", CLOUDIMG_SRC, cache)
    image = directory / IMAGE_NAME
    began = time.monotonic()
    with locked(directory):
        _remove_leftovers(directory)
        if not image.exists():
            _run_build(directory)
    prune_stale(directory, lambda other: not _has_mounts_under(other))
    return CloudImage(path=image, build_seconds=round(time.monotonic() - began, 2))


def _run_build(directory: Path) -> None:
    proc = subprocess.Popen(
        ["bash", str(CLOUDIMG_SRC / "build.sh"), str(directory)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group, so that a timeout reaches debootstrap, dpkg and chroot too
    )
    try:
        try:
            output, _ = proc.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the script's trap unmounts and cleans up
            try:
                output, _ = proc.communicate(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
            output += f"\n(killed after {BUILD_TIMEOUT:g} s)".encode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"tests/cloudimg/build.sh failed ({proc.returncode}):\n{output.decode(errors='replace')}")


def _has_mounts_under(path: Path) -> bool:
    """Whether something is mounted below ``path``: a build killed before its trap leaves debootstrap's
    mounts (/proc, /sys, in containers the host's device nodes) in its tree, which must never be rm -rf'ed."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1].startswith(prefix) for line in mounts if len(line.split()) > 1)


def _remove_leftovers(directory: Path) -> None:
    """Remove the temp dirs of builds killed before their own cleanup ran (those holding mounts are left
    to build.sh, which unmounts them first)."""
    for leftover in directory.glob(".build-*"):
        if not _has_mounts_under(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


@pytest.fixture(scope="session")
def cloud_image() -> CloudImage:
    """The cached Debian 12 cloud image, built on first use (about 2 minutes cold)."""
    try:
        return build_cloud_image()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot build the Debian cloud image (as root; scripts/setup.sh --test installs its tools): {exc}")
