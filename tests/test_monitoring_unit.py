"""monitoring/ (the sampler and its schedule) on a host in memory (tests/fakehost.py): rates from the counters
of /proc, QMP and the guest agent, in milliseconds. The real-QEMU tests (test_monitor.py) stay.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from qemu_mcp_http.errors import InvalidInput, VMStateError
from qemu_mcp_http.monitoring.monitor import MonitorRun, monitor_vm
from qemu_mcp_http.vm.manager import VMManager

from .fakehost import FakeAgent, FakeHost

THREAD = 4711


def proc_stat(pid: int, utime: int, stime: int) -> bytes:
    """A /proc/<pid>/stat line (a comm with a space and a parenthesis, as QEMU's can be), started at tick 1000."""
    fields = ["S", *["0"] * 10, str(utime), str(stime), *["0"] * 6, "1000"]
    return f"{pid} (qemu sys (x)) {' '.join(fields)}\n".encode()


class Counters:
    """What the fake host's /proc, QMP and agent report; :meth:`advance` moves every counter on."""

    def __init__(self, host: FakeHost, pid: int) -> None:
        self.host, self.pid = host, pid
        self.uptime, self.ticks, self.read, self.rx = 20.0, 500, 4096, 1000
        self.write()

    def write(self) -> None:
        self.host.put(f"/proc/{self.pid}/stat", proc_stat(self.pid, self.ticks, 100))
        self.host.put(f"/proc/{self.pid}/task/{THREAD}/stat", proc_stat(THREAD, self.ticks // 2, 0))
        self.host.put(f"/proc/{self.pid}/status", b"Name:\tqemu\nVmRSS:\t  262144 kB\n")
        self.host.put("/proc/uptime", f"{self.uptime:.2f} 100.00\n".encode())

    def advance(self, seconds: float, ticks: int, read: int, rx: int) -> None:
        self.uptime += seconds
        self.ticks += ticks
        self.read += read
        self.rx += rx
        self.write()

    def blockstats(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"device": "", "qdev": "virtio-disk0", "stats": {"rd_bytes": self.read, "rd_operations": 1}}]

    def interfaces(self, mac: str) -> list[dict[str, Any]]:
        statistics = {"rx-bytes": self.rx, "tx-bytes": 10, "rx-packets": 1, "tx-packets": 1}
        return [{"name": "eth0", "hardware-address": mac, "statistics": statistics}]


@pytest.fixture
async def counters(fake_vms: VMManager, fake_host: FakeHost) -> Counters:
    agent = FakeAgent()
    fake_host.agent = agent
    await fake_vms.create("m", "x86_64", "512M", 1, None, None)
    await fake_vms.start("m")
    vm = fake_host.running()
    found = Counters(fake_host, vm.pid)
    mac = json.loads(fake_host.files["/vms/m/vm.json"])["mac"]
    agent.facts["guest-network-get-interfaces"] = found.interfaces(mac)
    vm.answers.update(
        {
            "query-cpus-fast": [{"cpu-index": 0, "thread-id": THREAD}],
            "query-balloon": {"actual": 512 << 20},
            "qom-get": {"last-update": 1, "stats": {"stat-total-memory": 500 << 20, "stat-free-memory": 100 << 20}},
            "query-blockstats": found.blockstats,
            "query-block": [{"device": "virtio-disk0", "inserted": {"image": {"virtual-size": 1 << 30}}}],
        }
    )
    return found


async def test_samples_turn_counters_into_rates(fake_vms: VMManager, fake_host: FakeHost, counters: Counters) -> None:
    """The first sample is over the VM's life, the next over the interval: CPU, memory, disk and network."""
    run = MonitorRun()
    samples: list[dict[str, Any]] = []

    async def on_sample(n: int, sample: dict[str, Any]) -> None:
        samples.append(sample)
        counters.advance(seconds=2.0, ticks=100, read=2048, rx=500)
        agent = fake_host.running().agent
        assert agent is not None
        agent.facts["guest-network-get-interfaces"][0]["statistics"]["rx-bytes"] = counters.rx

    await monitor_vm(fake_vms.dir, "m", "all", 1, 2, on_sample, run)
    first, second = samples
    assert first["rates_over"] == "since_vm_start" and first["rate_seconds"] == 10.0  # started at tick 1000
    assert second["rates_over"] == "interval" and second["rate_seconds"] == 2.0
    assert second["cpu"]["process_cpu_percent"] == 50.0 and second["cpu"]["host_cpu_percent"] == 25.0
    assert second["cpu"]["vcpus"][0]["cpu_percent"] == 25.0
    assert second["memory"]["qemu_rss_bytes"] == 256 << 20 and second["memory"]["guest_free_bytes"] == 100 << 20
    assert second["disk"]["devices"]["virtio-disk0"]["read_bytes_per_s"] == 1024.0
    assert second["network"]["nic0"]["rx_bytes_per_s"] == 250.0 and second["network"]["source"] == "guest-agent"
    assert len(run.samples) == 2


async def test_a_stopped_vm_cannot_be_monitored(fake_vms: VMManager) -> None:
    await fake_vms.create("off", "x86_64", "256M", 1, None, None)
    with pytest.raises(VMStateError, match="only running VMs can be monitored"):
        await monitor_vm(fake_vms.dir, "off", "all", 1, 1, _ignore, MonitorRun())


@pytest.mark.parametrize(
    ("metrics", "interval", "count", "field"),
    [("gpu", 1.0, 1, "metrics"), ("all", 0.5, 1, "interval"), ("all", float("nan"), 1, "interval"),
     ("all", 1.0, -1, "count")],
)  # fmt: skip
async def test_bad_schedules_are_refused(
    fake_vms: VMManager, metrics: str, interval: float, count: int, field: str
) -> None:
    with pytest.raises(InvalidInput, match=f"'{field}'"):
        await monitor_vm(fake_vms.dir, "any", metrics, interval, count, _ignore, MonitorRun())


async def _ignore(n: int, sample: dict[str, Any]) -> None:
    return None
