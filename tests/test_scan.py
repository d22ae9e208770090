"""The remote directory scan's parser, from recorded outputs of its script; the bound on what a scan reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qemu_mcp_http.errors import HostError
from qemu_mcp_http.hosts.local import _scan_subdirs
from qemu_mcp_http.hosts.scan import ScanChanged, parse_scan, scan_argv

FILES = ("vm.json", "runtime.json", "qemu.pid")

RECORDED = (
    b"D a\nP a 4242\nD b\nD empty\nS\n"
    b"  9 a/vm.json\n  2 a/runtime.json\n  5 a/qemu.pid\n 29 /proc/4242/cmdline\n  9 b/vm.json\n 54 total\nC\n"
    b'{"x": 1}\n{}4242\n'
    b"qemu-system-x86_64\0-name\0a\0\xff\0"
    b'{"y": 2}\n'
)


def test_recorded_scan() -> None:
    found = parse_scan(RECORDED, FILES)
    assert set(found) == {"a", "b", "empty"}
    assert found["a"].files == {"vm.json": b'{"x": 1}\n', "runtime.json": b"{}", "qemu.pid": b"4242\n"}
    assert found["a"].cmdline == b"qemu-system-x86_64\0-name\0a\0\xff\0"  # bytes kept as they are
    assert found["b"].files == {"vm.json": b'{"y": 2}\n', "runtime.json": None, "qemu.pid": None}
    assert found["b"].cmdline is None
    assert found["empty"].files == dict.fromkeys(FILES)


def test_empty_directory() -> None:
    assert parse_scan(b"S\nC\n", FILES) == {}


def test_a_file_that_changed_in_between_asks_for_a_new_scan() -> None:
    with pytest.raises(ScanChanged):
        parse_scan(RECORDED[:-3], FILES)


def test_garbage_is_an_error() -> None:
    with pytest.raises(HostError):
        parse_scan(b"sh: 1: cannot open\n", FILES)


@pytest.mark.parametrize("how", ["script", "local"])
def test_a_scan_reads_at_most_its_total(tmp_path: Path, how: str) -> None:
    """Definitions padded to 600 KiB each: a scan with a 1 MiB total reads the first and reports the others
    as too big (their VMs unreadable), by the remote script (run here with sh) and by the local scanner."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vm.json").write_bytes(b" " * (600 << 10))
    if how == "script":
        output = subprocess.run(scan_argv(str(tmp_path), FILES, "qemu.pid", 1 << 20, 1 << 20), capture_output=True)
        found = parse_scan(output.stdout, FILES)
    else:
        found = _scan_subdirs(str(tmp_path), FILES, "qemu.pid", max_total=1 << 20)
    assert found["a"].files["vm.json"] == b" " * (600 << 10)
    for name in ("b", "c"):
        assert found[name].files["vm.json"] is None and found[name].oversized == {"vm.json"}
