"""Validation rules of tool arguments and the stored definition (pure, no I/O)."""

from __future__ import annotations

import pytest

from qemu_mcp_http.errors import InvalidInput, LimitExceeded
from qemu_mcp_http.vm.spec import (
    DiskDefinition,
    VMDefinition,
    disk_format_for,
    format_size,
    parse_arch,
    parse_disk,
    parse_memory_mib,
    parse_size_bytes,
    validate_name,
    validate_path,
    validate_vcpus,
)

GIB = 1 << 30


@pytest.mark.parametrize("name", ["web-1", "a", "Db_2.prod", "x" * 63])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", None, "-rf", ".hidden", "a/b", "../x", "a b", "x" * 64, "vm;rm", "é"])
def test_bad_names(name: str | None) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_name(name)
    assert info.value.field == "name"


@pytest.mark.parametrize(("given", "arch"), [("x86_64", "x86_64"), ("amd64", "x86_64"), ("AArch64", "arm64")])
def test_arch_aliases(given: str, arch: str) -> None:
    assert parse_arch(given) == arch


@pytest.mark.parametrize("given", [None, "", "riscv64", "i386"])
def test_bad_arch(given: str | None) -> None:
    with pytest.raises(InvalidInput, match="x86_64"):
        parse_arch(given)


@pytest.mark.parametrize(
    ("text", "mib"), [("2G", 2048), ("4096M", 4096), ("512M", 512), ("512", 512), ("1.5G", 1536), ("2GiB", 2048)]
)
def test_memory_forms(text: str, mib: int) -> None:
    assert parse_memory_mib(text, max_mib=1 << 20) == mib


@pytest.mark.parametrize("text", ["lots", "0", "-1G", "8K", "1.3M", "2Q", ""])
def test_bad_memory(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_memory_mib(text, max_mib=1 << 20)
    assert info.value.field == "memory"


def test_memory_limit() -> None:
    with pytest.raises(LimitExceeded, match="limit of 4G"):
        parse_memory_mib("8G", max_mib=4096)


def test_vcpus() -> None:
    assert validate_vcpus(2, 8) == 2
    for bad in (0, -1, True):
        with pytest.raises(InvalidInput):
            validate_vcpus(bad, 8)
    with pytest.raises(LimitExceeded):
        validate_vcpus(9, 8)


def test_sizes() -> None:
    assert parse_size_bytes("20G", "disk") == 20 * GIB
    assert parse_size_bytes("1T", "disk") == 1 << 40
    assert format_size(20 * GIB) == "20G"
    assert format_size(1536 << 10) == "1536K"
    assert format_size(1000) == "1000"


def test_disk_spec() -> None:
    spec = parse_disk("path=/data/vm/a.qcow2,size=10G", max_disk_bytes=100 * GIB)
    assert (spec.path, spec.size_bytes, spec.format) == ("/data/vm/a.qcow2", 10 * GIB, None)
    assert parse_disk(None, 1).path is None
    assert parse_disk("size=1G,format=raw", 100 * GIB).format == "raw"
    assert parse_disk("path=/x/../y/d.img", GIB).path == "/y/d.img"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("/data/a.qcow2", "malformed"),
        ("path=", "malformed"),
        ("colour=red", "malformed"),
        ("path=relative.qcow2", "absolute"),
        ("path=/a,b.qcow2", "malformed"),
        ("size=1G,size=2G", "twice"),
        ("size=big", "not a size"),
        ("format=vmdk", "qcow2 or raw"),
    ],
)
def test_bad_disk_specs(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        parse_disk(text, max_disk_bytes=100 * GIB)


def test_disk_limit() -> None:
    with pytest.raises(LimitExceeded):
        parse_disk("size=2T", max_disk_bytes=100 * GIB)


def test_paths_cannot_smuggle_options() -> None:
    for bad in ("-drive", "iso.iso", "/a,if=floppy", "/a\nb"):
        with pytest.raises(InvalidInput):
            validate_path(bad, "iso")


def test_disk_format_by_extension() -> None:
    assert disk_format_for("/a/b.img", None) == "raw"
    assert disk_format_for("/a/b.RAW", None) == "raw"
    assert disk_format_for("/a/b.qcow2", None) == "qcow2"
    assert disk_format_for("/a/b.qcow2", "raw") == "raw"


def test_definition_round_trip() -> None:
    definition = VMDefinition(
        name="vm1",
        arch="arm64",
        memory_mib=512,
        vcpus=1,
        disk=DiskDefinition("/v/vm1/vm1.qcow2", "qcow2", GIB, True),
        iso=None,
        uuid="2c1d7f5e-2a43-4c47-9a5c-7e0b0b5d3f11",
        mac="52:54:00:12:34:56",
        created_at="2026-11-25T00:00:00Z",
        machine="virt",
    )
    assert VMDefinition.from_json(definition.to_json()) == definition
    assert definition.summary()["memory"] == "512M"
    for broken in ({}, {**definition.to_json(), "arch": "mips"}, {**definition.to_json(), "name": "../x"}):
        with pytest.raises(ValueError, match="not a VM definition"):
            VMDefinition.from_json(broken)
