"""Real Debian 12 guests for the tests that need a real OS (guest access, console, snapshots).

One VM on the local host (through the session server) and one on the test sshd (through the remote server),
each made from the cloud image (tests/cloud_image.py) by the product itself: a linked clone, a cloud-init
seed with a user ``ops`` and a key of the test's, and a forward of the guest's port 22. Both boot at once
(two TCG guests on two cores: about 60-130 s) and serve every test module of the session that asks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .cloud_image import CloudImage
from .sshd import SSHServer
from .support import ServerProcess, ToolClient, kill_vms_under, open_tools

__all__ = ["Debian", "DebianPair", "debian_pair", "file_sha256", "ssh_argv"]

USER = "ops"
#: Generous: a first boot under TCG on a loaded 2-core machine has been seen at 130 s to SSH.
BOOT_TIMEOUT = 420.0


@dataclass(frozen=True)
class Debian:
    """A running Debian guest made by the product."""

    name: str
    url: str
    #: Host arguments of the calls that reach it (empty: the local host).
    where: dict[str, Any]
    image: Path
    key: Path
    started: dict[str, Any]

    @property
    def ssh(self) -> dict[str, Any]:
        hint: dict[str, Any] = self.started["data"]["details"]["ssh"]
        return hint


@dataclass(frozen=True)
class DebianPair:
    local: Debian
    remote: Debian
    #: The image's checksum before any guest ran on it.
    image_sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def ssh_argv(guest: Debian, *command: str, jump: SSHServer | None = None) -> list[str]:
    """A real ``ssh`` login to the guest with its cloud-init key, through the test sshd for the remote one."""
    options = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    options += ["-o", "ConnectTimeout=20", "-o", "BatchMode=yes", "-i", str(guest.key)]
    if jump is not None:
        proxy = (
            f"ssh -i {jump.key} -p {jump.port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            f"-o LogLevel=ERROR {jump.user}@{jump.address} -W %h:%p"
        )
        options += ["-o", f"ProxyCommand={proxy}"]
    return ["ssh", *options, "-p", str(guest.ssh["port"]), f"{USER}@{guest.ssh['host']}", *command]


def _keypair(directory: Path) -> tuple[Path, str]:
    key = directory / "guest_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key, key.with_suffix(".pub").read_text().strip()


async def _boot(url: str, name: str, where: dict[str, Any], image: Path, public_key: str) -> dict[str, Any]:
    async with open_tools(url) as tools:
        await tools.ok(
            "manage_vm",
            **where,
            name=name,
            action="create",
            arch="x86_64",
            memory="1G",
            vcpus=2,
            image=str(image),
            disk="size=4G",
            cloud_init={"user": USER, "ssh_authorized_keys": [public_key]},
            ports=["22"],
        )
        return await tools.ok("manage_vm", **where, name=name, action="start", wait="ssh", wait_timeout=BOOT_TIMEOUT)


@pytest.fixture(scope="session")
async def debian_pair(
    cloud_image: CloudImage,
    server: ServerProcess,
    workdir: Path,
    remote_server: ServerProcess,
    sshd: SSHServer,
) -> AsyncIterator[DebianPair]:
    images = workdir / "images"
    image = cloud_image.link_into(images)
    remote_image = cloud_image.link_into(sshd.root / "images")
    os.chmod(sshd.root / "images", 0o755)
    os.chmod(remote_image, 0o644)
    key, public = _keypair(workdir)
    os.chown(key, pwd.getpwnam("root").pw_uid, -1)
    before = file_sha256(image)
    remote_where = {
        "host": sshd.address,
        "ssh_port": sshd.port,
        "ssh_user": sshd.user,
        "ssh_key": str(sshd.key),
        "vm_dir": str(sshd.vm_dir),
    }

    try:
        local_start, remote_start = await asyncio.gather(
            _boot(server.url, "deb", {}, image, public),
            _boot(remote_server.url, "rdeb", remote_where, remote_image, public),
        )
        yield DebianPair(
            local=Debian("deb", server.url, {}, image, key, local_start),
            remote=Debian("rdeb", remote_server.url, remote_where, remote_image, key, remote_start),
            image_sha256=before,
        )
    finally:
        try:
            for url, name, where in ((server.url, "deb", {}), (remote_server.url, "rdeb", remote_where)):
                async with open_tools(url) as tools:
                    await tools.call("manage_vm", **where, name=name, action="delete", stop_timeout=60)
        finally:
            kill_vms_under(server.vm_dir / "deb")
            kill_vms_under(sshd.vm_dir / "rdeb")


async def guest_call(tools: ToolClient, guest: Debian, tool: str, **arguments: Any) -> dict[str, Any]:
    """A call on ``guest`` with its host arguments."""
    return await tools.call(tool, **guest.where, name=guest.name, **arguments)
