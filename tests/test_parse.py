"""Metric parsers, fed with outputs recorded from a real QEMU 7.2 and Linux."""

from __future__ import annotations

from typing import Any

from qemu_mcp_http.monitoring.parse import (
    block_sizes,
    blockstats_by_device,
    guest_nic_stats,
    parse_meminfo_kib,
    parse_proc_stat,
    parse_status_rss_kib,
    parse_uptime,
)

# /proc/<pid>/stat of a QEMU whose comm holds a space and a parenthesis.
PROC_STAT = (
    b"8590 (qemu-web 1) x) S 1 8587 7453 0 -1 4194304 2849 6538 5 2 1234 567 3 1 20 0 1 0 1094939 16961536 "
    b"3390 18446744073709551615 94240366534656 94240366534997 140734430121328 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0"
)
STATUS = b"Name:\tqemu-system-x86\nVmPeak:\t 3120000 kB\nVmRSS:\t  215432 kB\nThreads:\t6\n"
MEMINFO = b"MemTotal:       24634020 kB\nMemFree:        20301512 kB\nMemAvailable:   23012236 kB\n"

BLOCKSTATS: list[dict[str, Any]] = [
    {
        "device": "disk0",
        "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
        "stats": {"rd_bytes": 1048576, "wr_bytes": 4194304, "rd_operations": 40, "wr_operations": 12},
        "node-name": "disk0-fmt",
    },
    {"device": "", "qdev": "cdrom0", "stats": {"rd_bytes": 12, "wr_bytes": 0, "rd_operations": 1, "wr_operations": 0}},
    {"stats": {}},
]
QUERY_BLOCK: list[dict[str, Any]] = [
    {
        "device": "disk0",
        "inserted": {"image": {"virtual-size": 21474836480, "actual-size": 200704, "format": "qcow2"}},
    },
    {"device": "cd0", "inserted": {"image": {"virtual-size": 17825792, "format": "raw"}}},
    {"device": "sd0", "tray_open": False},
]
GUEST_INTERFACES: list[dict[str, Any]] = [
    {"name": "lo", "hardware-address": "00:00:00:00:00:00", "statistics": {"rx-bytes": 1, "tx-bytes": 1}},
    {
        "name": "eth0",
        "hardware-address": "52:54:00:ab:cd:ef",
        "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}],
        "statistics": {
            "rx-bytes": 1820,
            "rx-packets": 9,
            "rx-errs": 0,
            "rx-dropped": 0,
            "tx-bytes": 65732,
            "tx-packets": 52,
            "tx-errs": 0,
            "tx-dropped": 0,
        },
    },
]


def test_proc_stat_comm_with_spaces() -> None:
    stat = parse_proc_stat(PROC_STAT)
    assert (stat.utime, stat.stime, stat.starttime) == (1234, 567, 1094939)
    assert stat.cpu_ticks == 1801


def test_status_meminfo_uptime() -> None:
    assert parse_status_rss_kib(STATUS) == 215432
    assert parse_status_rss_kib(b"Name:\tx\n") is None
    assert parse_meminfo_kib(MEMINFO, "MemAvailable") == 23012236
    assert parse_uptime(b"10946.52 21511.10\n") == 10946.52


def test_blockstats() -> None:
    stats = blockstats_by_device(BLOCKSTATS)
    assert stats["disk0"] == {"read_bytes": 1048576, "write_bytes": 4194304, "read_ops": 40, "write_ops": 12}
    assert stats["cdrom0"]["read_bytes"] == 12
    assert len(stats) == 2


def test_block_sizes() -> None:
    sizes = block_sizes(QUERY_BLOCK)
    assert sizes == {
        "disk0": {"virtual_size_bytes": 21474836480, "allocated_bytes": 200704},
        "cd0": {"virtual_size_bytes": 17825792, "allocated_bytes": None},
    }


def test_guest_nic_by_mac() -> None:
    assert guest_nic_stats(GUEST_INTERFACES, "52:54:00:AB:CD:EF") == {
        "rx_bytes": 1820,
        "tx_bytes": 65732,
        "rx_packets": 9,
        "tx_packets": 52,
    }
    assert guest_nic_stats(GUEST_INTERFACES, "52:54:00:00:00:01") is None
    assert guest_nic_stats([{"hardware-address": "52:54:00:ab:cd:ef"}], "52:54:00:ab:cd:ef") is None
