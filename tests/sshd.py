"""A real OpenSSH sshd for the remote-host tests, and a qemu-mcp-http server set up to reach it.

The sshd runs from its own config with its own host key, inside a network namespace of its
own reached over a veth pair (10.200.N.2; the "remote" host has an address of its own, as a
real one would), falling back to 127.0.0.2 where namespaces cannot be made.  It also listens
on a second address (10.200.N.3, or 127.0.0.1) whose key is deliberately not in known_hosts.
A dedicated user logs in with a password or a key; a second user (``other_user``) has a password of its
own and trusts the same key, as a second account of a real host that the operator's key opens would.
Teardown kills the VMs by PID, then sshd and its children by PID, then removes the namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .support import ServerProcess, free_port, kill_vms_under

SSHD = "/usr/sbin/sshd"
#: The test user's name is this prefix and a random suffix: each test session has its own user, so that
#: sessions running at the same time on one machine never reset each other's password or processes.
USER_PREFIX = "qmht-"


def _prune_stale_users() -> None:
    """Remove test users of earlier sessions that ended without their teardown (their home is gone)."""
    for entry in Path("/etc/passwd").read_text().splitlines():
        name, _, _, _, _, home, *_ = (*entry.split(":"), "", "", "", "", "", "")
        if name.startswith(USER_PREFIX) and home and not Path(home).exists():
            subprocess.run(["pkill", "-KILL", "-u", name], check=False)
            subprocess.run(["userdel", name], check=False, capture_output=True)


def _can_bind(address: str) -> bool:
    try:
        free_port(address)
    except OSError:
        return False
    return True


def _run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def _make_netns() -> tuple[str, str, str] | None:
    """A namespace with a veth to it: (name, sshd address, second address), or None when not possible."""
    if not shutil.which("ip"):
        return None
    n = secrets.randbelow(200) + 20
    name, outer, inner = f"qmh{n}{secrets.token_hex(2)}", f"qmv{n}a{secrets.token_hex(2)}", f"qmv{n}b"
    address, second = f"10.200.{n}.2", f"10.200.{n}.3"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner],
        ["ip", "link", "set", inner, "netns", name],
        ["ip", "addr", "add", f"10.200.{n}.1/24", "dev", outer],
        ["ip", "link", "set", outer, "up"],
        ["ip", "-n", name, "addr", "add", f"{address}/24", "dev", inner],
        ["ip", "-n", name, "addr", "add", f"{second}/24", "dev", inner],
        ["ip", "-n", name, "link", "set", inner, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
    ]
    for step in steps:
        if subprocess.run(step, capture_output=True).returncode != 0:
            _drop_netns(name)
            subprocess.run(["ip", "link", "del", outer], capture_output=True)
            return None
    return name, address, second


def _drop_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)  # its veth end goes with it


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@dataclass
class SSHServer:
    """The test sshd: where it listens, who logs in, and with what."""

    root: Path
    address: str
    port: int
    password: str = field(repr=False)
    #: Another address of the same sshd, not in known_hosts (an unknown host key).
    second_address: str = "127.0.0.1"
    netns: str | None = None
    user: str = field(default_factory=lambda: USER_PREFIX + secrets.token_hex(4))
    #: A second account: its own password, and the same authorized key as ``user``.
    other_user: str = field(default_factory=lambda: USER_PREFIX + secrets.token_hex(4))
    other_password: str = field(default_factory=lambda: "Pw-" + secrets.token_urlsafe(12), repr=False)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_dir(self) -> Path:
        return self.root / "sshd"

    @property
    def key(self) -> Path:
        return self.root / "keys" / "id_ed25519"

    @property
    def key_dir(self) -> Path:
        return self.root / "keys"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def vm_dir(self) -> Path:
        return self.root / "vms"

    @property
    def log_path(self) -> Path:
        return self.conf_dir / "sshd.log"

    def host_key_line(self, name: str | None = None) -> str:
        public = (self.conf_dir / "ssh_host_ed25519_key.pub").read_text().split()
        return f"[{name or self.address}]:{self.port} {public[0]} {public[1]}\n"

    def setup(self) -> None:
        self.conf_dir.mkdir(parents=True)
        self.key_dir.mkdir(mode=0o700)
        home = self.root / "home"
        home.mkdir()
        self.vm_dir.mkdir()
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.conf_dir / "ssh_host_ed25519_key"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qmh-test", "-f", str(self.key))
        shutil.copy(self.key.with_suffix(".pub"), self.conf_dir / "authorized_keys")
        _prune_stale_users()
        _run("useradd", "-M", "-d", str(home), "-s", "/bin/sh", self.user)
        _run("chpasswd", stdin=f"{self.user}:{self.password}\n")
        shutil.chown(home, self.user, self.user)
        other_home = self.root / "other-home"
        other_home.mkdir()
        _run("useradd", "-M", "-d", str(other_home), "-s", "/bin/sh", self.other_user)
        _run("chpasswd", stdin=f"{self.other_user}:{self.other_password}\n")
        shutil.chown(other_home, self.other_user, self.other_user)
        shutil.chown(self.vm_dir, self.user, self.user)
        self.known_hosts.write_text(self.host_key_line())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        listen = "\n".join(f"ListenAddress {a}" for a in dict.fromkeys([self.address, self.second_address]))
        (self.conf_dir / "sshd_config").write_text(
            f"""Port {self.port}
{listen}
HostKey {self.conf_dir}/ssh_host_ed25519_key
PidFile {self.conf_dir}/sshd.pid
AuthorizedKeysFile {self.conf_dir}/authorized_keys
AllowUsers {self.user} {self.other_user}
PermitRootLogin no
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
MaxSessions 10
MaxStartups 100
AllowStreamLocalForwarding yes
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""
        )

    def start(self, timeout: float = 10.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []  # execs sshd: same pid
        self.proc = subprocess.Popen(
            [*inside, SSHD, "-D", "-e", "-f", str(self.conf_dir / "sshd_config")], stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log_path.read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection((self.address, self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError("sshd did not listen")

    def unused_port(self) -> int:
        """A port of the sshd's address where nothing listens (a refused connection)."""
        if self.netns:
            return self.port + 1 if self.port < 65535 else self.port - 1
        return free_port(self.address)

    def connection_pids(self) -> list[int]:
        """The per-connection sshd processes (each connection: a privileged monitor and its session child)."""
        found: list[int] = []
        todo = [self.proc.pid] if self.proc else []
        while todo:
            kids = _children(todo.pop())
            found += kids
            todo += kids
        return found

    def stop(self) -> None:
        if self.proc is None:
            return
        children = self.connection_pids()
        for pid in [self.proc.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop sshd and every connection it serves, then listen again on the same port."""
        self.stop()
        self.start()


@pytest.fixture(scope="session", name="sshd")
def sshd_fixture() -> Iterator[SSHServer]:
    if os.geteuid() != 0 or not os.path.exists(SSHD):
        pytest.skip("the remote-host tests need root and /usr/sbin/sshd (openssh-server)")
    root = Path(tempfile.mkdtemp(prefix="qmhr-", dir="/tmp"))
    root.chmod(0o755)  # the test user must reach its home and vm_dir below
    password = "Pw-" + secrets.token_urlsafe(12)
    netns = None if os.environ.get("QEMU_MCP_TEST_NO_NETNS") else _make_netns()
    if netns is not None:
        name, address, second = netns
        server = SSHServer(root, address, 2222, password, second_address=second, netns=name)
    else:
        address = "127.0.0.2" if _can_bind("127.0.0.2") else "127.0.0.1"
        second = "127.0.0.1" if address != "127.0.0.1" else "localhost"
        server = SSHServer(root, address, free_port(address), password, second_address=second)
    try:
        server.setup()
        server.start()
        yield server
    finally:
        kill_vms_under(server.vm_dir)
        server.stop()
        if server.netns:
            _drop_netns(server.netns)
        shutil.rmtree(root, ignore_errors=True)
        for user in (server.user, server.other_user):
            subprocess.run(["pkill", "-KILL", "-u", user], check=False)
            subprocess.run(["userdel", user], check=False, capture_output=True)


@pytest.fixture(scope="session", name="remote_server")
def remote_server_fixture(sshd: SSHServer) -> Iterator[ServerProcess]:
    """A qemu-mcp-http server whose settings trust the test sshd (and nothing else)."""
    local_vms = sshd.root / "local-vms"
    local_vms.mkdir()
    named = sshd.root / "hosts.json"
    named.write_text(
        json.dumps(
            {
                "lab": {"address": sshd.address, "port": sshd.port, "user": sshd.user, "key": str(sshd.key)},
                "fenced": {
                    "address": sshd.address,
                    "port": sshd.port,
                    "user": sshd.user,
                    "key": str(sshd.key),
                    "allowed_roots": [str(sshd.vm_dir)],
                },
            }
        )
    )
    with ServerProcess(
        vm_dir=local_vms,
        # The remote VMs (under sshd.vm_dir) are killed by PID too, with the local ones.
        reap_under=sshd.root,
        env={
            "QEMU_MCP_ACCEL": "tcg",
            "QEMU_MCP_ALLOWED_ROOTS": str(sshd.root),
            "QEMU_MCP_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
            "QEMU_MCP_SSH_KEY_DIRS": str(sshd.key_dir),
            # The tests log in to the test sshd's address with the key too, not only through named hosts.
            "QEMU_MCP_ALLOW_CLIENT_SSH_KEYS": "1",
            "QEMU_MCP_SSH_CONNECT_TIMEOUT": "3",
            "QEMU_MCP_SSH_HOSTS_FILE": str(named),
            "QEMU_MCP_LOG_LEVEL": "DEBUG",
        },
    ) as srv:
        yield srv
