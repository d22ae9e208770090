"""Pure parsers of /proc files and QMP/QGA replies (tested from recorded outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ProcStat",
    "blockstats_by_device",
    "block_sizes",
    "guest_nic_stats",
    "parse_meminfo_kib",
    "parse_proc_stat",
    "parse_status_rss_kib",
    "parse_uptime",
]


@dataclass(frozen=True)
class ProcStat:
    """Fields of ``/proc/<pid>/stat`` (or ``/proc/<pid>/task/<tid>/stat``) we need, in clock ticks."""

    utime: int
    stime: int
    starttime: int

    @property
    def cpu_ticks(self) -> int:
        return self.utime + self.stime


def parse_proc_stat(raw: bytes) -> ProcStat:
    """:raise ValueError: not a stat line.  The comm field may hold spaces and parentheses: split after the last ')'."""
    text = raw.decode(errors="replace")
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime=14, stime=15, starttime=22 (1-based) -> indexes 11, 12, 19.
    return ProcStat(utime=int(rest[11]), stime=int(rest[12]), starttime=int(rest[19]))


def parse_uptime(raw: bytes) -> float:
    return float(raw.split()[0])


def parse_status_rss_kib(raw: bytes) -> int | None:
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def parse_meminfo_kib(raw: bytes, key: str) -> int | None:
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def blockstats_by_device(reply: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``query-blockstats`` → {device or qdev: counters}."""
    out: dict[str, dict[str, int]] = {}
    for entry in reply:
        name = entry.get("device") or entry.get("qdev") or entry.get("node-name")
        stats = entry.get("stats") or {}
        if not name:
            continue
        out[str(name)] = {
            "read_bytes": int(stats.get("rd_bytes", 0)),
            "write_bytes": int(stats.get("wr_bytes", 0)),
            "read_ops": int(stats.get("rd_operations", 0)),
            "write_ops": int(stats.get("wr_operations", 0)),
        }
    return out


def block_sizes(reply: list[dict[str, Any]]) -> dict[str, dict[str, int | None]]:
    """``query-block`` → {device: {virtual_size_bytes, allocated_bytes}} for devices with media."""
    out: dict[str, dict[str, int | None]] = {}
    for entry in reply:
        image = (entry.get("inserted") or {}).get("image") or {}
        if not image or not entry.get("device"):
            continue
        actual = image.get("actual-size")
        out[str(entry["device"])] = {
            "virtual_size_bytes": int(image.get("virtual-size", 0)),
            "allocated_bytes": int(actual) if actual is not None else None,
        }
    return out


def guest_nic_stats(reply: list[dict[str, Any]], mac: str) -> dict[str, int] | None:
    """``guest-network-get-interfaces`` → counters of the interface with ``mac`` (our NIC), if the agent gives them."""
    for iface in reply:
        if str(iface.get("hardware-address", "")).lower() != mac.lower():
            continue
        stats = iface.get("statistics")
        if not stats:
            return None
        return {
            "rx_bytes": int(stats["rx-bytes"]),
            "tx_bytes": int(stats["tx-bytes"]),
            "rx_packets": int(stats["rx-packets"]),
            "tx_packets": int(stats["tx-packets"]),
        }
    return None
