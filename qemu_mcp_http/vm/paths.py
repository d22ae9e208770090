"""Where a VM's files live: ``<vm_dir>/<name>/``."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from functools import cached_property

__all__ = [
    "CREATE_JOURNAL",
    "DEFINITION_FILE",
    "LOCKS_DIR",
    "MANAGED_NAMES",
    "PID_FILE",
    "RUNTIME_FILE",
    "UNIX_PATH_MAX",
    "VM_DIR_MARKERS",
    "VMPaths",
]

#: sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

DEFINITION_FILE = "vm.json"
RUNTIME_FILE = "runtime.json"
PID_FILE = "qemu.pid"
#: Written first by create, removed last: what an interrupted create made, so that delete can undo it.
CREATE_JOURNAL = ".create.json"
LOCKS_DIR = ".locks"
#: A directory holding one of these is a VM directory (or one being made).
VM_DIR_MARKERS = (DEFINITION_FILE, CREATE_JOURNAL)
#: Names of the files the server keeps in a VM directory: never a disk, an ISO or an image, and the only files
#: delete removes from a VM directory besides a disk the tool created there.
MANAGED_NAMES = frozenset(
    {
        DEFINITION_FILE,
        RUNTIME_FILE,
        PID_FILE,
        CREATE_JOURNAL,
        "qmp.sock",
        "qga.sock",
        "console.log",
        "console.sock",
        "vnc.sock",
        "efivars.fd",
        "seed.iso",
    }
)


@dataclass(frozen=True)
class VMPaths:
    vm_dir: str
    name: str

    @cached_property
    def directory(self) -> str:
        return posixpath.join(self.vm_dir, self.name)

    def _file(self, filename: str) -> str:
        return f"{self.directory}/{filename}"

    @cached_property
    def definition(self) -> str:
        return self._file(DEFINITION_FILE)

    @cached_property
    def journal(self) -> str:
        """What a create in progress has made (see ``CREATE_JOURNAL``)."""
        return self._file(CREATE_JOURNAL)

    @cached_property
    def runtime(self) -> str:
        """Facts of the current run (accelerator, start time, argv); stale once QEMU is gone."""
        return self._file(RUNTIME_FILE)

    @cached_property
    def qmp_socket(self) -> str:
        return self._file("qmp.sock")

    @cached_property
    def qga_socket(self) -> str:
        return self._file("qga.sock")

    @cached_property
    def pidfile(self) -> str:
        return self._file(PID_FILE)

    @cached_property
    def console_log(self) -> str:
        """Everything the serial console printed (QEMU's chardev log)."""
        return self._file("console.log")

    @cached_property
    def console_socket(self) -> str:
        """The serial console's input (and output) for one client at a time."""
        return self._file("console.sock")

    @cached_property
    def vnc_socket(self) -> str:
        """The VM's screen and keyboard over VNC: a unix socket, never a TCP port."""
        return self._file("vnc.sock")

    def screenshot(self, token: str) -> str:
        """Where QEMU writes one screendump (a random name, removed once read)."""
        return self._file(f".screen-{token}.png")

    @cached_property
    def seed(self) -> str:
        """The cloud-init NoCloud seed ISO."""
        return self._file("seed.iso")

    @cached_property
    def efi_vars(self) -> str:
        return self._file("efivars.fd")

    @cached_property
    def lock_file(self) -> str:
        """Outside the VM directory, so that delete can remove that while holding the lock."""
        return posixpath.join(self.vm_dir, ".locks", f"{self.name}.lock")

    def default_disk(self) -> str:
        return self._file(f"{self.name}.qcow2")
