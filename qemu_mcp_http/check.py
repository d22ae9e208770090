"""``qemu-mcp-http --check``: can the server run here, as configured?  One line per check, then a verdict.

``fail`` means the server, or one of its tools, cannot work until the operator acts; ``warn`` means it works
in a lesser way (TCG instead of KVM, remote hosts refused until their keys are known).
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TextIO

from .access.secret import load_shared_secret
from .access.tokens import load_tokens
from .config import Invocation, Settings
from .fleet.targets import load_named_hosts
from .hosts.local import LocalHost
from .vm.accel import AccelProbe
from .vm.argv import ARM64_FIRMWARE

__all__ = ["Check", "run_checks"]

Status = Literal["ok", "warn", "fail"]

#: Binary -> the Debian package that provides it.
BINARIES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-img": "qemu-utils",
}

_HOST_ARCH = {"x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Check:
    status: Status
    name: str
    detail: str
    #: What to do about a warn or fail.
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix else "")


def run_checks(invocation: Invocation, out: TextIO) -> int:
    """Print the report to ``out``; 0 when nothing failed, else 1."""
    failed = 0
    for check in _checks(invocation):
        print(check.line(), file=out, flush=True)
        failed += check.status == "fail"
    if failed:
        print(f"NOT usable: {failed} check{'s' if failed != 1 else ''} failed", file=out)
        return 1
    print("usable: the server can run here as configured", file=out)
    return 0


def _checks(invocation: Invocation) -> Iterator[Check]:
    try:
        settings = invocation.settings()
    except ValueError as exc:
        yield Check("fail", "configuration", str(exc), "fix the flag or QEMU_MCP_* variable named above")
        return
    yield Check("ok", "configuration", f"valid (vm_dir {settings.vm_dir}, accel {settings.accel})")
    yield _from_loader("bearer tokens", lambda: _tokens(settings), "fix or replace the token file")
    if settings.ssh_hosts_file:
        yield _from_loader(
            "named SSH hosts",
            lambda: f"{len(load_named_hosts(settings.ssh_hosts_file))} in {settings.ssh_hosts_file}",
            "fix the file named above",
        )
    if settings.shared_secret_file:
        yield _from_loader(
            "shared secret",
            lambda: f"{settings.shared_secret_file} holds {len(load_shared_secret(settings) or b'')} bytes",
            "write at least 32 random bytes to it (openssl rand -hex 32)",
        )
    found: dict[str, str] = {}
    for binary, package in BINARIES.items():
        path = shutil.which(binary)
        if path:
            found[binary] = path
            yield Check("ok", binary, path)
        else:
            yield Check("fail", binary, "not found on PATH", f"install the Debian package {package}")
    for what, path in (("UEFI code", ARM64_FIRMWARE.code), ("UEFI variables", ARM64_FIRMWARE.vars_template)):
        if os.path.isfile(path):
            yield Check("ok", f"arm64 {what}", path)
        else:
            yield Check("fail", f"arm64 {what}", f"{path} is missing", "install the Debian package qemu-efi-aarch64")
    yield _vm_dir(settings)
    yield _known_hosts(settings)
    yield _accel(settings, found)


def _from_loader(name: str, load: Callable[[], str], fix: str) -> Check:
    try:
        return Check("ok", name, load())
    except ValueError as exc:
        return Check("fail", name, str(exc), fix)


def _tokens(settings: Settings) -> str:
    tokens = load_tokens(settings)
    if tokens:
        return f"{len(tokens)} configured: /mcp and /metrics require one"
    return f"none: /mcp is open to anyone who can reach {settings.host}:{settings.port} (loopback only)"


def _vm_dir(settings: Settings) -> Check:
    path = settings.vm_dir
    if os.path.isdir(path):
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            return Check("fail", "vm_dir", f"{path} is not writable ({exc.strerror})", "chown it to the server's user")
        return Check("ok", "vm_dir", f"{path} is writable")
    if os.path.exists(path):
        return Check("fail", "vm_dir", f"{path} is not a directory", "point QEMU_MCP_VM_DIR at a directory")
    parent = os.path.dirname(path.rstrip("/"))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and os.access(parent, os.W_OK | os.X_OK):
        return Check("ok", "vm_dir", f"{path} does not exist yet; it will be created (under {parent})")
    return Check(
        "fail",
        "vm_dir",
        f"{path} does not exist and {parent or '/'} is not writable",
        "create it, owned by the server's user",
    )


def _known_hosts(settings: Settings) -> Check:
    path = os.path.expanduser(settings.ssh_known_hosts)
    policy = settings.ssh_host_key_policy
    if policy == "off":
        return Check("warn", "ssh host keys", "not checked (policy off)", "use strict or accept-new outside labs")
    if os.path.isfile(path) and os.access(path, os.R_OK):
        return Check("ok", "ssh host keys", f"{path} (policy {policy})")
    return Check(
        "warn",
        "ssh host keys",
        f"{path} is missing or unreadable: remote hosts will be refused until their keys are in it",
        "add them with ssh-keyscan, or use --ssh-host-key-policy accept-new",
    )


def _accel(settings: Settings, found: dict[str, str]) -> Check:
    if settings.accel == "tcg":
        return Check("ok", "accelerator", "tcg (configured)")
    machine = platform.machine()
    arch = _HOST_ARCH.get(machine)
    if arch is None:
        return Check("warn", "accelerator", f"host arch {machine}: every guest runs under TCG (slow)")
    binary = "qemu-system-x86_64" if arch == "x86_64" else "qemu-system-aarch64"
    if binary not in found:
        return Check("fail", "accelerator", f"cannot probe KVM without {binary}", "install it (see above)")
    with tempfile.TemporaryDirectory(prefix="qemu-mcp-check-") as scratch:
        choice = asyncio.run(AccelProbe().choose(LocalHost(), arch, settings, scratch))
    if choice.accel == "kvm":
        return Check("ok", "accelerator", f"KVM works for {arch} guests ({choice.reason})")
    if settings.accel == "kvm":
        return Check(
            "fail",
            "accelerator",
            f"accel is kvm but KVM does not run guests here ({choice.reason})",
            "give the user read-write access to /dev/kvm (group kvm; containers: --device /dev/kvm), or set accel auto",
        )
    return Check(
        "warn",
        "accelerator",
        f"guests will run under TCG, much slower ({choice.reason})",
        "give the user read-write access to /dev/kvm (group kvm; containers: --device /dev/kvm)",
    )
