"""Property-based bad input over the real HTTP interface: every answer is an envelope, nothing outside moves."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import ServerProcess, ToolClient, kill_vms_under, open_tools

T = TypeVar("T")


class BackgroundClient:
    """A ToolClient on an event loop of its own thread, callable from hypothesis' synchronous tests."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stop = asyncio.Event()
        ready: Future[ToolClient] = Future()

        async def own() -> None:
            async with open_tools(url) as tools:
                ready.set_result(tools)
                await self._stop.wait()

        self._owner = asyncio.run_coroutine_threadsafe(own(), self.loop)
        self.tools = ready.result(timeout=20)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._owner.result(timeout=20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_env(workdir: Path) -> Iterator[tuple[BackgroundClient, ServerProcess, Path]]:
    root = workdir / "fuzz"
    sentinel = workdir / "fuzz-sentinel"
    sentinel.mkdir()
    (sentinel / "file").write_text("untouched")
    (root / "vms").mkdir(parents=True)
    with ServerProcess(
        vm_dir=root / "vms",
        reap_under=root,
        env={
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_MAX_MEMORY_MIB": "256",
            "QEMU_MCP_MAX_VCPUS": "2",
            "QEMU_MCP_MAX_DISK_GIB": "1",
            "QEMU_MCP_STOP_TIMEOUT": "1",
        },
    ) as srv:
        client = BackgroundClient(srv.url)
        try:
            yield client, srv, sentinel
        finally:
            client.close()


def snapshot(path: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime) for p in [path, *path.rglob("*")]}


nasty_text = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "../../etc",
            "/etc/passwd",
            "-rf",
            "--help",
            "a\x00b",
            "x" * 5000,
            "名前",
            "path=/etc/shadow,size=1G",
            "path=../../x.qcow2",
            "size=99999999T",
            "-1G",
            "1e309",
            "$(reboot)",
            "`id`",
            "vm; rm -rf /",
        ]
    ),
)
numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True), st.none())


@st.composite
def manage_args(draw: st.DrawFn) -> dict[str, Any]:
    args: dict[str, Any] = {
        "name": draw(nasty_text),
        "action": draw(st.one_of(st.sampled_from(["create", "delete", "modify", "stop"]), nasty_text)),
    }
    for key, strategy in (
        ("arch", st.one_of(st.sampled_from(["x86_64", "arm64", "aarch64"]), nasty_text)),
        ("memory", st.one_of(nasty_text, st.sampled_from(["128M", "2G", "99999T"]))),
        ("disk", nasty_text),
        ("iso", nasty_text),
        ("vm_dir", nasty_text),
        ("vcpus", numbers),
        ("ssh_port", numbers),
    ):
        if draw(st.booleans()):
            args[key] = draw(strategy)
    return args


def check_envelope(answer: dict[str, Any]) -> None:
    assert set(answer) == {"success", "message", "data"}
    assert isinstance(answer["message"], str) and answer["message"]
    assert "Traceback" not in json.dumps(answer)


FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@FUZZ
@given(args=manage_args())
def test_manage_vm_fuzz(fuzz_env: tuple[BackgroundClient, ServerProcess, Path], args: dict[str, Any]) -> None:
    client, srv, sentinel = fuzz_env
    before = snapshot(sentinel)
    answer = client.run(client.tools.call("manage_vm", **args))
    check_envelope(answer)
    assert snapshot(sentinel) == before
    # Whatever was created lives in the vm_dir, with a name the rules allow.
    for entry in srv.vm_dir.iterdir():
        assert entry.name == ".locks" or not entry.name.startswith(("-", "."))  # .locks: the server's lock files


@FUZZ
@given(
    status=st.one_of(st.sampled_from(["running", "stopped", "all"]), nasty_text),
    arch=st.one_of(st.none(), nasty_text),
    filter_name=st.one_of(st.none(), nasty_text),
    vm_dir=st.one_of(st.none(), nasty_text),
)
def test_list_vms_fuzz(
    fuzz_env: tuple[BackgroundClient, ServerProcess, Path],
    status: str,
    arch: str | None,
    filter_name: str | None,
    vm_dir: str | None,
) -> None:
    client, _, _ = fuzz_env
    args = {k: v for k, v in {"status": status, "arch": arch, "filter_name": filter_name, "vm_dir": vm_dir}.items()}
    check_envelope(client.run(client.tools.call("list_vms", **{k: v for k, v in args.items() if v is not None})))


@FUZZ
@given(
    name=nasty_text,
    metrics=st.one_of(st.sampled_from(["all", "cpu"]), nasty_text),
    interval=numbers,
    count=numbers,
)
def test_monitor_fuzz(
    fuzz_env: tuple[BackgroundClient, ServerProcess, Path], name: str, metrics: str, interval: Any, count: Any
) -> None:
    client, _, _ = fuzz_env
    args: dict[str, Any] = {"name": name, "metrics": metrics}
    if interval is not None:
        args["interval"] = interval
    if count is not None:
        args["count"] = count
    answer = client.run(client.tools.call("monitor_vm_status", **args), timeout=30)
    check_envelope(answer)
    assert not answer["success"]  # no VM runs here


# -- existing files as disks and ISOs: the header of an image names other files -------------------------

header_kinds = st.sampled_from(["raw", "zeros", "qcow2", "backing-out", "data-file-out", "json", "nbd", "vmdk", "dir"])


def plant(path: Path, kind: str, sentinel: Path) -> None:
    """A file as a guest (or anyone) could have left it: plain bytes, or an image header naming other files."""
    victim = sentinel / "file"
    img = ["qemu-img", "create", "-q"]
    if kind == "raw":
        path.write_bytes(b"QFI\xfb" + bytes(508))  # a qcow2 magic and nothing valid behind it
    elif kind == "zeros":
        path.write_bytes(bytes(65536))
    elif kind == "dir":
        path.mkdir()
    else:
        argv = {
            "qcow2": [*img, "-f", "qcow2", str(path), "1M"],
            "backing-out": [*img, "-f", "qcow2", "-u", "-b", str(victim), "-F", "raw", str(path), "1M"],
            "data-file-out": [*img, "-f", "qcow2", "-o", f"data_file={sentinel}/data.raw,data_file_raw=on", str(path)],
            "json": [
                *img,
                "-f",
                "qcow2",
                "-u",
                "-b",
                f'json:{{"driver":"file","filename":"{victim}"}}',
                "-F",
                "raw",
                str(path),
                "1M",
            ],
            "nbd": [*img, "-f", "qcow2", "-u", "-b", "nbd:127.0.0.1:1", "-F", "raw", str(path), "1M"],
            "vmdk": [*img, "-f", "vmdk", str(path), "1M"],
        }[kind]
        if kind == "data-file-out":
            argv.append("1M")
        subprocess.run(argv, check=True, capture_output=True)


def sentinel_opened_by_qemu(root: Path, sentinel: Path) -> list[str]:
    found = []
    for pidfile in root.rglob("qemu.pid"):
        try:
            fds = Path(f"/proc/{int(pidfile.read_text())}/fd")
            links = [os.readlink(fd) for fd in fds.iterdir()]
        except (OSError, ValueError):
            continue
        found += [link for link in links if link.startswith(str(sentinel))]
    return found


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    kind=header_kinds,
    as_iso=st.booleans(),
    fmt=st.sampled_from(["", ",format=raw", ",format=qcow2"]),
    start=st.booleans(),
)
def test_existing_files_as_disks_fuzz(
    fuzz_env: tuple[BackgroundClient, ServerProcess, Path], kind: str, as_iso: bool, fmt: str, start: bool
) -> None:
    """Whatever header an existing file has, QEMU never opens a file outside the roots through it."""
    client, srv, sentinel = fuzz_env
    planted = srv.vm_dir / f"planted-{secrets.token_hex(4)}"
    plant(planted, kind, sentinel)  # qemu-img makes the data file of a data-file image: before the snapshot
    before = snapshot(sentinel)
    name = f"fz-{secrets.token_hex(3)}"
    args: dict[str, Any] = {"name": name, "action": "create", "arch": "x86_64", "memory": "64M", "vcpus": 1}
    if as_iso:
        args.update(iso=str(planted), disk="size=16M")
    else:
        args["disk"] = f"path={planted}{fmt}"
    try:
        created = client.run(client.tools.call("manage_vm", **args))
        check_envelope(created)
        if created["success"] and start:
            check_envelope(client.run(client.tools.call("manage_vm", name=name, action="start")))
            assert not sentinel_opened_by_qemu(srv.vm_dir, sentinel)
        if created["success"]:
            deleted = client.run(client.tools.call("manage_vm", name=name, action="delete", stop_timeout=0))
            assert deleted["success"], deleted
    finally:
        kill_vms_under(srv.vm_dir / name)
        if planted.is_dir():
            planted.rmdir()
        else:
            planted.unlink(missing_ok=True)
    assert snapshot(sentinel) == before


numbers_extreme = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 2**70, "nan", "inf", "1e999"]),
    st.floats(allow_nan=True, allow_infinity=True),
)


@FUZZ
@given(
    stop_timeout=numbers_extreme, interval=numbers_extreme, size=st.from_regex(r"[1-9][0-9]{14,499}", fullmatch=True)
)
def test_non_finite_and_huge_numbers_fuzz(
    fuzz_env: tuple[BackgroundClient, ServerProcess, Path], stop_timeout: Any, interval: Any, size: str
) -> None:
    """Non-finite and huge numbers get an envelope naming the field, never a hang or an internal error."""
    client, _, _ = fuzz_env
    for answer in (
        client.run(client.tools.call("manage_vm", name="nobody", action="stop", stop_timeout=stop_timeout)),
        client.run(client.tools.call("monitor_vm_status", name="nobody", interval=interval), timeout=10),
        client.run(client.tools.call("manage_vm", name="huge", action="create", arch="x86_64", memory=size)),
        client.run(client.tools.call("manage_vm", name="huge", action="create", arch="x86_64", disk=f"size={size}G")),
    ):
        check_envelope(answer)
        assert not answer["success"] and "internal error" not in answer["message"], answer
