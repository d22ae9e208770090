"""VM definitions and run-time facts on a host's disk, read in batches."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import VMNotFound, VMStateError
from ..hosts.base import OFF_LOOP_BYTES, Host, SubdirFiles, parse_pid
from .paths import DEFINITION_FILE, PID_FILE, RUNTIME_FILE, VMPaths
from .spec import VMDefinition

__all__ = ["ProcessFacts", "VMEntry", "VMStore", "parse_pid", "process_matches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessFacts:
    """What the pid file and /proc say about a VM's QEMU, before asking QMP."""

    pid: int | None
    alive: bool
    runtime: Mapping[str, Any]


def process_matches(cmdline: bytes | None, paths: VMPaths) -> bool:
    """True when ``/proc/<pid>/cmdline`` is this VM's QEMU (a reused pid is someone else)."""
    if not cmdline:
        return False
    args = cmdline.split(b"\0")
    return bool(args) and b"qemu-system-" in args[0] and f"unix:{paths.qmp_socket},".encode() in cmdline


@dataclass(frozen=True)
class VMEntry:
    """What ``<vm_dir>/<name>`` is: nothing, a symbolic link, a directory without a (readable) definition, or a VM."""

    kind: Literal["missing", "symlink", "incomplete", "unreadable", "vm"]
    definition: VMDefinition | None = None


class VMStore:
    """The VMs of one ``vm_dir`` on one host."""

    def __init__(self, host: Host, vm_dir: str, io_timeout: float) -> None:
        self.host = host
        self.vm_dir = vm_dir
        self.io_timeout = io_timeout
        self._paths: dict[str, VMPaths] = {}  # list_vms asks for the same paths several times per VM

    def paths(self, name: str) -> VMPaths:
        paths = self._paths.get(name)
        if paths is None:
            paths = self._paths[name] = VMPaths(self.vm_dir, name)
        return paths

    async def entry(self, name: str) -> VMEntry:
        """What ``<vm_dir>/<name>`` holds (the directory's ``lstat`` and the definition, read at once)."""
        paths = self.paths(name)
        st, raws = await asyncio.gather(
            self.host.stat(paths.directory, timeout=self.io_timeout),
            self.host.read_files([paths.definition], timeout=self.io_timeout),
        )
        if st is None:
            return VMEntry("missing")
        if st.is_symlink:
            return VMEntry("symlink")
        if not st.is_dir:
            return VMEntry("missing")
        raw = raws[paths.definition]
        if raw is None:
            # Missing, or too big / not a regular file: only a missing one means a create cut short.
            present = await self.host.stat(paths.definition, timeout=self.io_timeout)
            return VMEntry("unreadable" if present is not None else "incomplete")
        definition = self._decode(name, raw)
        return VMEntry("vm", definition) if definition is not None else VMEntry("unreadable")

    async def load(self, name: str) -> VMDefinition:
        """:raise VMNotFound: no (readable, valid) definition of ``name``.
        :raise VMStateError: ``<vm_dir>/<name>`` is a symbolic link, which is never followed."""
        found = await self.entry(name)
        if found.definition is not None:
            return found.definition
        where = f"in {self.vm_dir} on {self.host.name}"
        if found.kind == "symlink":
            raise VMStateError(
                f"{self.paths(name).directory} is a symbolic link, not a VM directory: it is never followed; "
                "delete removes the link (only the link)"
            )
        if found.kind == "incomplete":
            raise VMNotFound(
                f"VM {name} {where} is incomplete (a create was cut short); delete removes what that create made"
            )
        if found.kind == "unreadable":
            raise VMNotFound(
                f"the definition of VM {name} {where} is unreadable; fix {self.paths(name).definition} or delete the VM"
            )
        raise VMNotFound(f"VM {name} not found {where}; list_vms shows the VMs there, create makes a new one")

    async def save(self, definition: VMDefinition) -> None:
        data = json.dumps(definition.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        await self.host.write_file(self.paths(definition.name).definition, data, timeout=self.io_timeout)

    async def save_runtime(self, name: str, runtime: Mapping[str, Any]) -> None:
        data = json.dumps(dict(runtime), sort_keys=True).encode() + b"\n"
        await self.host.write_file(self.paths(name).runtime, data, timeout=self.io_timeout)

    async def process_facts(self, names: Sequence[str]) -> dict[str, ProcessFacts]:
        """Pid, liveness and run-time facts of several VMs in two batched reads."""
        all_paths = {name: self.paths(name) for name in names}
        first = [p for paths in all_paths.values() for p in (paths.pidfile, paths.runtime)]
        raws = await self.host.read_files(first, timeout=self.io_timeout) if first else {}
        pids = {name: parse_pid(raws.get(paths.pidfile)) for name, paths in all_paths.items()}
        proc_paths = {name: f"/proc/{pid}/cmdline" for name, pid in pids.items() if pid is not None}
        cmdlines = await self.host.read_files(list(proc_paths.values()), timeout=self.io_timeout) if proc_paths else {}
        return {
            name: _facts(paths, pids[name], cmdlines.get(proc_paths.get(name, "")), raws.get(paths.runtime))
            for name, paths in all_paths.items()
        }

    async def scan(self) -> tuple[list[tuple[VMDefinition, ProcessFacts]], list[str], list[str]]:
        """Every VM of ``vm_dir`` with its process facts, in one host operation (one round trip over SSH).

        Returns the VMs, the names whose definition is unreadable, and the names of directories
        without a definition (a create cut short by a crash); the last two are never counted as VMs.
        """
        snapshot = await self.host.scan_subdirs(
            self.vm_dir, (DEFINITION_FILE, RUNTIME_FILE, PID_FILE), pidfile=PID_FILE, timeout=self.io_timeout
        )
        size = sum(len(raw or b"") for found in snapshot.values() for raw in found.files.values())
        if size <= OFF_LOOP_BYTES:
            return self._decode_scan(snapshot)
        # Up to SCAN_TOTAL_MAX of definitions: decoded in a thread, so that the event loop waits at most for
        # one definition's parse (a 1 MiB file) at a time rather than for all of them.
        return await asyncio.to_thread(self._decode_scan, snapshot)

    def _decode_scan(
        self, snapshot: Mapping[str, SubdirFiles]
    ) -> tuple[list[tuple[VMDefinition, ProcessFacts]], list[str], list[str]]:
        vms: list[tuple[VMDefinition, ProcessFacts]] = []
        broken: list[str] = []
        incomplete: list[str] = []
        for name, found in snapshot.items():
            raw = found.files.get(DEFINITION_FILE)
            definition = self._decode(name, raw)
            if definition is None:
                unreadable = raw is not None or found.is_symlink or DEFINITION_FILE in found.oversized
                (broken if unreadable else incomplete).append(name)
                continue
            paths = self.paths(name)
            pid = parse_pid(found.files.get(PID_FILE))
            vms.append((definition, _facts(paths, pid, found.cmdline, found.files.get(RUNTIME_FILE))))
        return vms, broken, incomplete

    def _decode(self, name: str, raw: bytes | None) -> VMDefinition | None:
        if raw is None:
            return None
        try:
            # Only definitions of an ordinary size are cached: a host that pads thousands of valid ones to the
            # 1 MiB read limit would otherwise make the cache hold gigabytes.
            definition = _decode_cached(raw) if len(raw) <= MAX_CACHED_DEFINITION_BYTES else _decode_definition(raw)
        except (ValueError, RecursionError) as exc:
            log.warning(
                "ignoring unreadable definition of %s in %s on %s: %s",
                name,
                self.vm_dir,
                self.host.name,
                exc,
            )
            return None
        if definition.name != name:
            log.warning(
                "ignoring definition in %s/%s: it names VM %s",
                self.vm_dir,
                name,
                definition.name,
            )
            return None
        return definition


def _facts(paths: VMPaths, pid: int | None, cmdline: bytes | None, raw_runtime: bytes | None) -> ProcessFacts:
    alive = pid is not None and process_matches(cmdline, paths)
    runtime: Mapping[str, Any] = {}
    if alive and raw_runtime:
        try:
            runtime = json.loads(raw_runtime)
        except ValueError:
            runtime = {}
    return ProcessFacts(pid=pid if alive else None, alive=alive, runtime=runtime)


#: The largest definition file whose decoded form is cached (ours are about 1 KiB): 4096 of them, at most 64 MiB.
MAX_CACHED_DEFINITION_BYTES = 16 * 1024


def _decode_definition(raw: bytes) -> VMDefinition:
    """A definition from its file's bytes, checked (:meth:`VMDefinition.from_json`).

    :raise ValueError, RecursionError: not a definition.
    """
    return VMDefinition.from_json(json.loads(raw))


#: The same bytes give the same (immutable) definition again without parsing and checking them again: a scan of
#: many VMs whose files did not change costs a lookup each. Bounded; what fails is never cached.
_decode_cached = functools.lru_cache(maxsize=4096)(_decode_definition)
