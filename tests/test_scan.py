"""The remote directory scan's parser, from recorded outputs of its script."""

from __future__ import annotations

import pytest

from qemu_mcp_http.errors import HostError
from qemu_mcp_http.hosts.scan import ScanChanged, parse_scan

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
