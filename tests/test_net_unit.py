"""net/ (port forwards and the host ports they bind) on a host in memory (tests/fakehost.py): the branches in
milliseconds. The real-QEMU tests (test_ports.py, test_guest_access.py) stay.
"""

from __future__ import annotations

import pytest

from qemu_mcp_http.config import Settings
from qemu_mcp_http.errors import InvalidInput, VMStateError
from qemu_mcp_http.net.hostports import AUTO_PORTS
from qemu_mcp_http.vm.create import GuestAccess
from qemu_mcp_http.vm.fence import Fence, FenceRules
from qemu_mcp_http.vm.manager import VMManager
from qemu_mcp_http.vm.shared import SharedState
from qemu_mcp_http.vm.spec import DiskDefinition, VMDefinition
from qemu_mcp_http.vm.vmdir import VMDir

from .fakehost import QUICK, FakeHost

#: /proc/net/tcp with a socket on 127.0.0.1:2222 (0x08AE).
PROC_NET_TCP = (
    b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    b"   0: 0100007F:08AE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
)


def hostfwd(host: FakeHost) -> list[str]:
    argv = host.running().argv
    netdev = argv[argv.index("-netdev") + 1]
    return [part.removeprefix("hostfwd=") for part in netdev.split(",") if part.startswith("hostfwd=")]


async def test_a_guest_port_gets_a_free_host_port_and_keeps_it(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """'22' is given a port of the automatic range at start, recorded, and given again at the next start."""
    await fake_vms.create("p", "x86_64", "256M", 1, None, None, GuestAccess(ports=["22", "8080:80"]))
    await fake_vms.start("p")
    first = hostfwd(fake_host)
    port = int(first[0].split(":")[2].split("-")[0])
    assert port in AUTO_PORTS and first[1] == "tcp:127.0.0.1:8080-:80"
    await fake_vms.stop("p", QUICK)
    await fake_vms.start("p")
    assert hostfwd(fake_host) == first
    listed, _ = await fake_vms.list()
    row = fake_vms.row(*listed[0])
    assert row["ssh"]["command"] == f"ssh -p {port} 127.0.0.1"


async def test_a_fixed_host_port_in_use_refuses_the_start(fake_vms: VMManager, fake_host: FakeHost) -> None:
    fake_host.put("/proc/net/tcp", PROC_NET_TCP)
    await fake_vms.create("b", "x86_64", "256M", 1, None, None, GuestAccess(ports=["2222:22"]))
    with pytest.raises(VMStateError, match="host port 2222/tcp is in use on fake"):
        await fake_vms.start("b")
    assert not [vm for vm in fake_host.vms.values() if vm.alive]


async def test_qemu_failing_to_bind_a_forward_is_said_plainly(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """The port was free when read, taken by the time QEMU bound it: the message names the port, not QEMU's words."""
    await fake_vms.create("q", "x86_64", "256M", 1, None, None, GuestAccess(ports=["2223:22"]))
    fake_host.fail(
        lambda argv: argv[0].startswith("qemu-system-"),
        "qemu-system-x86_64: Could not set up host forwarding rule 'tcp:127.0.0.1:2223-:22'",
    )
    with pytest.raises(VMStateError, match=r"host port 2223/tcp could not be bound on fake"):
        await fake_vms.start("q")


@pytest.mark.parametrize(
    ("ports", "network", "why"),
    [
        (["22"], "none", "forwards need network 'user'"),
        (["70000:22"], None, "out of range"),
        (["22", "22"], None, "both"),
    ],
)
async def test_forwards_that_cannot_be_are_refused_at_create(
    fake_vms: VMManager, ports: list[str], network: str | None, why: str
) -> None:
    with pytest.raises(InvalidInput, match=why):
        await fake_vms.create("x", "x86_64", "256M", 1, None, None, GuestAccess(ports=ports, network=network))


async def test_an_ssh_host_s_forward_is_reached_through_it(fake_host: FakeHost) -> None:
    """On a remote host the port is bound there: the login hint jumps through that host."""
    fake_host.ssh_jump = "ops@lab"
    settings = Settings(vm_dir="/vms", accel="tcg")
    vms = VMDir(fake_host, "/vms", settings, SharedState(), Fence(fake_host, FenceRules(roots=None), 5.0))
    disk = DiskDefinition("/vms/j/j.qcow2", "qcow2", 1 << 30, True)
    definition = VMDefinition(
        name="j", arch="x86_64", memory_mib=256, vcpus=1, disk=disk, iso=None, uuid="u", mac="52:54:00:00:00:01",
        created_at="now", machine="q35", ports=("2201:22",),
    )  # fmt: skip
    hint = vms.ssh_hint(definition)
    assert hint is not None and hint["command"] == "ssh -J ops@lab -p 2201 127.0.0.1" and hint["on_host"] == "fake"
