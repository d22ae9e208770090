"""Replicas behind a load balancer, for real on loopback: a ``redis-server``, two ``qemu-mcp-http`` replicas
sharing one vm_dir, Redis and a secret, in stateless mode, and HAProxy running ``deploy/haproxy.cfg`` as
shipped (only its environment variables point it at this machine's free ports).

Every process is started here and killed by PID at teardown, whatever the tests did; the QEMUs under the
shared vm_dir are killed by PID too (``ServerProcess(reap_under=...)``).

Also: a recorder of which replica served each HTTP request (HAProxy's ``X-Served-By`` header, read by an
httpx response hook of the real MCP client), the replicas' ``/metrics`` counters, HAProxy's own view of the
replicas (its stats page as CSV), and the holder of a VM's ``flock`` (``/proc/locks``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from mcp import Client
from mcp.client.session import ElicitationFnT, MessageHandlerFnT
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from prometheus_client.parser import text_string_to_metric_families

from .support import REPO, ServerProcess, free_port, kill_groups, kill_vms_under, pids_running, slow_command_path

__all__ = [
    "HAPROXY",
    "HAPROXY_CFG",
    "REDIS_SERVER",
    "REPLICA_NAMES",
    "SLOW_CREATE_VM",
    "Hop",
    "LoadBalancer",
    "Recorder",
    "Redis",
    "Replicas",
    "cluster",
    "lb_client",
    "lock_holder",
    "replicas",
    "sticky_config",
]

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CLI = "/usr/bin/redis-cli"
HAPROXY = "/usr/sbin/haproxy"
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
#: The server names of deploy/haproxy.cfg's backend, in the order of LB_REPLICA_1 and LB_REPLICA_2.
REPLICA_NAMES = ("replica-1", "replica-2")
#: A VM whose ``qemu-img create`` sleeps first on both replicas (a shim on their PATH): a create of that name
#: holds the VM's lock for :data:`SLOW_CREATE_SECONDS`, so that a replica can be killed holding it.
SLOW_CREATE_VM = "slowmade"
SLOW_CREATE_SECONDS = 60
STARTUP_TIMEOUT = 20.0


def require_program(path: str, package: str) -> None:
    """Fail, not skip: the replica tests are part of the suite, and ``scripts/setup.sh --test`` installs it."""
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: apt-get install {package} (scripts/setup.sh --test installs it)")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the process by its PID and reap it."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


# -- Redis -------------------------------------------------------------------------------------------


@dataclass
class Redis:
    """Debian's ``redis-server`` on a free loopback port, without persistence."""

    directory: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def start(self) -> None:
        require_program(REDIS_SERVER, "redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.directory), "--logfile", str(self.log_path), "--daemonize", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {_log_tail(self.log_path)}")
            with contextlib.suppress(OSError):
                if self.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING: {_log_tail(self.log_path)}")

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def command(self, *args: str) -> str:
        """A command through ``redis-cli`` (from redis-tools, which redis-server depends on)."""
        done = subprocess.run(
            [REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    def pubsub_clients(self) -> int:
        """Connections subscribed to a channel or a pattern (each replica's event bus holds one)."""
        subscribed = 0
        for line in self.command("CLIENT", "LIST").splitlines():
            fields = dict(item.partition("=")[::2] for item in line.split())
            subscribed += int(fields.get("sub", "0")) + int(fields.get("psub", "0")) > 0
        return subscribed

    def published(self) -> int:
        """PUBLISH commands Redis has served so far (``INFO commandstats``)."""
        calls = 0
        for line in self.command("INFO", "commandstats").splitlines():
            if line.startswith(("cmdstat_publish:", "cmdstat_spublish:")):
                stats = dict(item.partition("=")[::2] for item in line.partition(":")[2].split(","))
                calls += int(stats["calls"])
        return calls

    def stop(self) -> None:
        _stop(self.proc)


# -- HAProxy -----------------------------------------------------------------------------------------


@dataclass
class LoadBalancer:
    """``haproxy -f deploy/haproxy.cfg -db``: the shipped file (or ``config``), its variables pointed at
    loopback ports."""

    directory: Path
    backends: dict[str, int]
    config: Path = HAPROXY_CFG
    port: int = field(default_factory=free_port)
    stats_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"haproxy-{self.port}.log"

    def environment(self) -> dict[str, str]:
        """The variables deploy/haproxy.cfg reads."""
        first, second = (self.backends[name] for name in REPLICA_NAMES)
        return {
            "LB_BIND": f"127.0.0.1:{self.port}",
            "LB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "LB_REPLICA_1": f"127.0.0.1:{first}",
            "LB_REPLICA_2": f"127.0.0.1:{second}",
        }

    def start(self) -> None:
        require_program(HAPROXY, "haproxy")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [HAPROXY, "-f", str(self.config), "-db"],
            env={**os.environ, **self.environment()},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        try:
            self.wait_for({name: "UP" for name in REPLICA_NAMES}, STARTUP_TIMEOUT)
        except AssertionError as exc:
            raise RuntimeError(f"{exc}\nhaproxy log:\n{_log_tail(self.log_path)}") from exc

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's stats page as CSV: a row per replica and one for the whole backend (``BACKEND``)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited: {_log_tail(self.log_path)}")
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas"}

    def states(self) -> dict[str, str]:
        """HAProxy's status of each replica (``UP``, ``DOWN``, ``UP 1/2`` while going down, ...)."""
        return {name: row["status"] for name, row in self.stats().items() if name in REPLICA_NAMES}

    def wait_for(self, expected: dict[str, str], timeout: float) -> float:
        """Seconds until every replica of ``expected`` has that status.

        :raise AssertionError: not within ``timeout``.
        """
        began = time.monotonic()
        seen: dict[str, str] = {}
        while time.monotonic() - began < timeout:
            with contextlib.suppress(httpx.HTTPError):
                seen = self.states()
                if all(seen.get(name) == status for name, status in expected.items()):
                    return time.monotonic() - began
            time.sleep(0.02)
        raise AssertionError(f"haproxy did not see {expected} within {timeout:g} s; it sees {seen}")

    def stop(self) -> None:
        _stop(self.proc)


# -- the replicas ------------------------------------------------------------------------------------


@dataclass
class Replicas:
    """Two replicas (``replica-1``, ``replica-2``: HAProxy's names for them), Redis and HAProxy."""

    root: Path
    vm_dir: Path
    secret_file: Path
    redis: Redis
    servers: dict[str, ServerProcess]
    lb: LoadBalancer
    #: The directory of the ``qemu-img`` shim (see :data:`SLOW_CREATE_VM`).
    shim_dir: Path

    @property
    def url(self) -> str:
        """The MCP endpoint through the load balancer."""
        return self.lb.url

    def other(self, name: str) -> str:
        (other,) = (n for n in REPLICA_NAMES if n != name)
        return other

    def by_pid(self, pid: int) -> str | None:
        for name, server in self.servers.items():
            if server.proc is not None and server.proc.pid == pid:
                return name
        return None

    async def health(self, name: str) -> dict[str, Any]:
        """The replica's own ``GET /healthz`` (not through the load balancer)."""
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{self.servers[name].port}/healthz", timeout=5)
            answer.raise_for_status()
            found: dict[str, Any] = answer.json()
            return found

    async def tool_calls(self, name: str) -> Counter[tuple[str, str]]:
        """``qemu_mcp_tool_calls_total`` of the replica, by (tool, outcome)."""
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{self.servers[name].port}/metrics", timeout=5)
            answer.raise_for_status()
        counts: Counter[tuple[str, str]] = Counter()
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                if sample.name == "qemu_mcp_tool_calls_total":
                    counts[(sample.labels["tool"], sample.labels["outcome"])] += int(sample.value)
        return counts

    def ensure_both_up(self) -> None:
        """Restart a replica a test left stopped, and wait until HAProxy sends requests to both again."""
        for server in self.servers.values():
            if server.proc is None or server.proc.poll() is not None:
                server.start()
        self.lb.wait_for({name: "UP" for name in REPLICA_NAMES}, 30)

    def logs(self) -> str:
        parts = [
            f"--- {name} ---\n{_log_tail(s.log_path, 4000) if s.log_path else ''}" for name, s in self.servers.items()
        ]
        return "\n".join([*parts, f"--- haproxy ---\n{_log_tail(self.lb.log_path, 4000)}"])


@contextlib.contextmanager
def cluster(workdir: Path, label: str, *, stateless: bool = True, config: Path = HAPROXY_CFG) -> Iterator[Replicas]:
    """Redis, two replicas on one vm_dir (``<workdir>/<label>-vms``, so that the session's guest ISOs under
    ``<workdir>`` are allowed) with the shared secret, and HAProxy with ``config`` in front; every process
    killed by PID on the way out, the QEMUs under the vm_dir and the ``qemu-img`` shims too."""
    require_program(REDIS_SERVER, "redis-server")
    require_program(HAPROXY, "haproxy")
    root = workdir / label
    vm_dir = workdir / f"{label}-vms"
    root.mkdir()
    vm_dir.mkdir()
    secret_file = root / "shared-secret"
    secret_file.write_text(secrets.token_hex(32) + "\n")  # 64 random characters
    secret_file.chmod(0o600)
    shim_dir = root / "bin"
    path = slow_command_path(shim_dir, "qemu-img", f"create *{SLOW_CREATE_VM}*", SLOW_CREATE_SECONDS)
    with contextlib.ExitStack() as stack:
        stack.callback(kill_vms_under, vm_dir)
        stack.callback(lambda: kill_groups(pids_running(str(shim_dir))))
        redis = Redis(root / "redis")
        stack.callback(redis.stop)
        redis.start()
        servers: dict[str, ServerProcess] = {}
        for name in REPLICA_NAMES:
            env = {
                "QEMU_MCP_ACCEL": "tcg",
                "QEMU_MCP_ALLOWED_ROOTS": str(workdir),
                "QEMU_MCP_REDIS_URL": redis.url,
                "QEMU_MCP_SHARED_SECRET_FILE": str(secret_file),
                "QEMU_MCP_QMP_IDLE_HOLD": "0.05",  # as deploy/compose.replicas.yaml
                # The rescan of the vm_dir for changes made by others, slowed to an hour: a change made on one
                # replica then reaches a listener on the other through Redis or not at all.
                "QEMU_MCP_WATCH_INTERVAL": "3600",
                "PATH": path,
            }
            if stateless:
                env["QEMU_MCP_STATELESS"] = "1"
            servers[name] = stack.enter_context(ServerProcess(vm_dir=vm_dir, reap_under=vm_dir, env=env))
        lb = LoadBalancer(root, {name: server.port for name, server in servers.items()}, config)
        stack.callback(lb.stop)
        lb.start()
        yield Replicas(root, vm_dir, secret_file, redis, servers, lb, shim_dir)


@pytest.fixture(scope="module")
def replicas(workdir: Path) -> Iterator[Replicas]:
    """The replicas as deployed by deploy/compose.replicas.yaml: stateless, deploy/haproxy.cfg unchanged."""
    with cluster(workdir, "rep") as running:
        yield running


def sticky_config(directory: Path) -> Path:
    """deploy/haproxy.cfg with its sticky-session lines (``#stick ...``) uncommented, written in ``directory``."""
    text = HAPROXY_CFG.read_text()
    sticky = text.replace("    #stick", "    stick")
    assert sticky.count("    stick") == 3, "deploy/haproxy.cfg should hold three commented-out `stick` lines"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "haproxy-sticky.cfg"
    path.write_text(sticky)
    return path


# -- which replica served what -----------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    """One HTTP exchange of the client through the load balancer."""

    http_method: str
    #: The JSON-RPC method of a POST (``tools/call``, ``subscriptions/listen``, ...), else ``None``.
    rpc: str | None
    #: The tool of a ``tools/call``.
    tool: str | None
    status: int
    #: HAProxy's ``X-Served-By``: the replica that answered.
    served_by: str | None
    #: The ``Mcp-Session-Id`` the response set (none in stateless mode).
    session_id: str | None = None


@dataclass
class Recorder:
    """An httpx response hook: records every exchange as it gets its response headers (before an SSE body)."""

    hops: list[Hop] = field(default_factory=list)

    async def __call__(self, response: httpx.Response) -> None:
        request = response.request
        rpc = tool = None
        if request.method == "POST":
            with contextlib.suppress(ValueError, httpx.RequestNotRead):
                body = json.loads(request.content)
                if isinstance(body, dict):
                    rpc = body.get("method")
                    params = body.get("params")
                    if rpc == "tools/call" and isinstance(params, dict):
                        tool = params.get("name")
        headers = response.headers
        self.hops.append(
            Hop(
                request.method,
                rpc,
                tool,
                response.status_code,
                headers.get("x-served-by"),
                headers.get("mcp-session-id"),
            )
        )

    def served(self, rpc: str | None = None, tool: str | None = None) -> list[str | None]:
        """The replica of each recorded exchange, in order (only of ``rpc``, of ``tool``, when given)."""
        return [h.served_by for h in self.hops if (rpc is None or h.rpc == rpc) and (tool is None or h.tool == tool)]


@contextlib.asynccontextmanager
async def lb_client(
    url: str,
    recorder: Recorder,
    *,
    mode: str = "auto",
    elicitation_callback: ElicitationFnT | None = None,
    message_handler: MessageHandlerFnT | None = None,
) -> AsyncIterator[Client]:
    """The real MCP client, over an httpx client with the SDK's timeouts whose responses ``recorder`` sees."""
    async with create_mcp_http_client() as http:
        http.event_hooks = {"response": [recorder]}
        async with Client(
            streamable_http_client(url, http_client=http),
            mode=mode,
            elicitation_callback=elicitation_callback,
            message_handler=message_handler,
        ) as client:
            yield client


# -- locks -------------------------------------------------------------------------------------------


def lock_holder(lock_file: Path) -> int | None:
    """The PID holding a ``flock`` on ``lock_file`` (``/proc/locks`` names locks by device and inode)."""
    try:
        stat = lock_file.stat()
    except FileNotFoundError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line has "->" after the number.
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        _major_minor, _, inode = parts[5].rpartition(":")
        if inode.isdigit() and int(inode) == stat.st_ino:
            return int(parts[4])
    return None
