"""guest/ (commands and files through the guest agent, readiness) on a host in memory (tests/fakehost.py): the
branches in milliseconds. The real-agent tests (test_guest.py, test_guest_access.py) stay.
"""

from __future__ import annotations

import base64

import pytest

from qemu_mcp_http.errors import GuestAgentError, InvalidInput, VMStateError
from qemu_mcp_http.guest.readiness import GuestNotReady
from qemu_mcp_http.vm.manager import VMManager

from .fakehost import FakeAgent, FakeHost


async def running(vms: VMManager, host: FakeHost, agent: FakeAgent | None) -> str:
    host.agent = agent
    await vms.create("g", "x86_64", "256M", 1, None, None)
    await vms.start("g")
    return "g"


async def test_exec_runs_an_argv_or_a_shell_string(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """The argv goes to guest-exec as it is (a string through /bin/sh -c), with stdin and the environment."""
    seen: list[tuple[list[str], bytes]] = []

    def run(argv: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        seen.append((argv, stdin))
        return 3, b"out", "é".encode()

    name = await running(fake_vms, fake_host, FakeAgent(run=run))
    result = await fake_vms.guest_exec(name, ["cat", "-"], "in", 5.0, {"LANG": "C"})
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (3, "out", "é")
    await fake_vms.guest_exec(name, "echo $LANG", None, 5.0)
    assert seen == [(["cat", "-"], b"in"), (["/bin/sh", "-c", "echo $LANG"], b"")]


async def test_exec_output_is_bounded(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """A guest writing more than --guest-output-limit gets its output cut and says so."""
    limit = fake_vms.settings.guest_output_limit
    name = await running(fake_vms, fake_host, FakeAgent(run=lambda argv, stdin: (0, b"x" * (limit + 10), b"")))
    result = await fake_vms.guest_exec(name, ["yes"], None, 5.0)
    assert len(result["stdout"]) == limit and result["stdout_truncated"] is True


async def test_exec_that_does_not_end_is_reported_with_its_pid(fake_vms: VMManager, fake_host: FakeHost) -> None:
    name = await running(fake_vms, fake_host, FakeAgent(polls_before_exit=10_000))
    with pytest.raises(GuestAgentError, match=r"did not end within 0\.2 s") as failure:
        await fake_vms.guest_exec(name, ["sleep", "1000"], None, 0.2)
    assert failure.value.details is not None and failure.value.details["pid"] == 700


@pytest.mark.parametrize(
    ("command", "env", "field"),
    [([], None, "command"), (["a\0b"], None, "command"), (["ls"], {"1BAD": "x"}, "env"), (["ls"], {"A": 1}, "env")],
)
async def test_exec_refuses_bad_input(
    fake_vms: VMManager, fake_host: FakeHost, command: list[str], env: object, field: str
) -> None:
    name = await running(fake_vms, fake_host, FakeAgent())
    with pytest.raises(InvalidInput, match=f"Invalid '{field}'"):
        await fake_vms.guest_exec(name, command, None, 5.0, env)


async def test_a_disabled_command_says_how_to_enable_it(fake_vms: VMManager, fake_host: FakeHost) -> None:
    name = await running(fake_vms, fake_host, FakeAgent(disabled={"guest-exec"}))
    with pytest.raises(GuestAgentError, match="has guest-exec disabled; enable it"):
        await fake_vms.guest_exec(name, ["ls"], None, 5.0)


async def test_a_stopped_vm_has_no_agent(fake_vms: VMManager) -> None:
    await fake_vms.create("off", "x86_64", "256M", 1, None, None)
    with pytest.raises(VMStateError, match="is not running; start it \\(wait='agent'"):
        await fake_vms.guest_info("off")


async def test_files_are_read_bounded_and_written(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """read_file cuts at max_bytes and sends binary as base64; write_file replaces or appends, then chmods."""
    agent = FakeAgent(files={"/etc/hostname": b"guest\n", "/bin/blob": bytes(range(256))})
    name = await running(fake_vms, fake_host, agent)
    read = await fake_vms.guest_read_file(name, "/etc/hostname", 3)
    assert (read["content"], read["truncated"]) == ("gue", True)
    binary = await fake_vms.guest_read_file(name, "/bin/blob", None)
    assert base64.b64decode(binary["content_base64"]) == bytes(range(256))
    await fake_vms.guest_write_file(name, "/tmp/f", "one\n", None, None, False)
    written = await fake_vms.guest_write_file(name, "/tmp/f", None, base64.b64encode(b"two\n").decode(), "0600", True)
    assert agent.files["/tmp/f"] == b"one\ntwo\n" and written["mode"] == "0600"
    assert agent.commands.count("guest-exec") == 1  # the chmod
    with pytest.raises(GuestAgentError, match="No such file"):
        await fake_vms.guest_read_file(name, "/nope", None)
    with pytest.raises(InvalidInput, match="exactly one of content"):
        await fake_vms.guest_write_file(name, "/tmp/f", "a", "YQ==", None, False)
    with pytest.raises(InvalidInput, match="not an octal file mode"):
        await fake_vms.guest_write_file(name, "/tmp/f", "a", None, "rwx", False)


async def test_info_keeps_what_the_agent_answers_and_names_what_it_does_not(
    fake_vms: VMManager, fake_host: FakeHost
) -> None:
    facts = {"guest-get-host-name": {"host-name": "web"}, "guest-get-osinfo": {"name": "Debian", "id": "debian"}}
    name = await running(fake_vms, fake_host, FakeAgent(facts=facts, disabled={"guest-get-users"}))
    info = await fake_vms.guest_info(name)
    assert info["hostname"] == "web" and info["os"] == {"name": "Debian"} and info["exec_enabled"] is True
    assert set(info["unavailable"]) == {"interfaces", "filesystems", "users"}


async def test_start_waits_for_the_agent(fake_vms: VMManager, fake_host: FakeHost) -> None:
    """wait='agent' returns once the agent answers, with what it says of the guest."""
    facts = {
        "guest-get-host-name": {"host-name": "up"},
        "guest-get-osinfo": {"pretty-name": "Debian GNU/Linux 12"},
        "guest-network-get-interfaces": [{"name": "eth0", "ip-addresses": [{"ip-address": "10.0.2.15", "prefix": 24}]}],
    }
    fake_host.agent = FakeAgent(facts=facts)
    await fake_vms.create("w", "x86_64", "256M", 1, None, None)
    message, details = await fake_vms.start("w", "agent", 5.0)
    assert "its guest agent answers" in message
    assert details["guest"] == {"hostname": "up", "os": "Debian GNU/Linux 12", "interfaces": {"eth0": ["10.0.2.15/24"]}}


async def test_a_guest_without_an_agent_is_not_ready_and_shows_its_console(
    fake_vms: VMManager, fake_host: FakeHost
) -> None:
    """The wait ends at its timeout with the console's last lines, escape sequences stripped; the VM runs on."""
    await fake_vms.create("s", "x86_64", "256M", 1, None, None)
    fake_host.put("/vms/s/console.log", b"booting\n\x1b[1mKernel panic\x1b[0m\n")
    with pytest.raises(GuestNotReady, match=r"the guest agent did not answer within 0\.3 s") as failure:
        await fake_vms.start("s", "agent", 0.3)
    assert failure.value.details == {"console_tail": ["booting", "Kernel panic"]}
    assert fake_host.running().alive
