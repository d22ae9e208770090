"""Benchmarks of qemu-mcp-http with real QEMU and the real MCP client over HTTP, each figure beside its baseline.

    .venv/bin/python -m benchmarks.run [--quick] [--json results.json] [--sections list,start,monitor,remote]

Prints a table and writes JSON. Not a test: nothing here passes or fails; the figures go to the README.
Everything it starts (a server process, QEMUs under a temporary vm_dir, an sshd) is killed by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import httpx2 as httpx
from mcp import Client
from qemu.qmp import QMPClient

from qemu_mcp_http.hosts.ssh import scan_argv
from qemu_mcp_http.vm.paths import DEFINITION_FILE, PID_FILE, RUNTIME_FILE
from tests.sshd import SSHServer
from tests.sshd import _free_port as sshd_free_port
from tests.support import ServerProcess, free_port, kill_vms_under, open_tools

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- figures -------------------------------------------------------------------------------------


def summarize(samples_s: list[float]) -> dict[str, float]:
    """Median, p95 and spread (IQR) in milliseconds."""
    ms = sorted(s * 1000 for s in samples_s)
    q = statistics.quantiles(ms, n=20, method="inclusive") if len(ms) > 1 else [ms[0]] * 19
    quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(q[18], 2),
        "iqr_ms": round(quartiles[2] - quartiles[0], 2),
        "min_ms": round(ms[0], 2),
    }


async def timed(n: int, call: Callable[[], Awaitable[Any]], warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        await call()
    out = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        out.append(time.perf_counter() - began)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, what: str, figure: str, baseline: str = "") -> None:
        self.rows.append((what, figure, baseline))
        print(f"  {what:<52} {figure:<28} {baseline}", flush=True)

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows) if self.rows else 10
        lines = [f"{'measure':<{width}}  {'qemu-mcp-http':<28}  baseline", "-" * (width + 50)]
        lines += [f"{a:<{width}}  {b:<28}  {c}" for a, b, c in self.rows]
        return "\n".join(lines)


def fmt(s: dict[str, float]) -> str:
    return f"{s['median_ms']:.1f} ms (p95 {s['p95_ms']:.1f})"


# -- the server and its VMs ---------------------------------------------------------------------


class Bench:
    def __init__(self, root: Path, report: Report, quick: bool) -> None:
        self.root = root
        self.report = report
        self.quick = quick
        self.vm_dir = root / "vms"
        self.vm_dir.mkdir()
        self.server: ServerProcess | None = None
        self.defined: list[str] = []
        self.running: list[str] = []

    def start_server(self) -> ServerProcess:
        srv = ServerProcess(
            vm_dir=self.vm_dir,
            env={
                "QEMU_MCP_ACCEL": "tcg",
                "QEMU_MCP_LOG_LEVEL": "WARNING",
                "QEMU_MCP_MAX_MONITOR_STREAMS_PER_CLIENT": "64",
                "QEMU_MCP_MAX_MONITOR_STREAMS": "64",
            },
        )
        srv.start()
        self.server = srv
        return srv

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server.proc is not None
        return self.server.proc.pid

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        assert self.server is not None
        async with open_tools(self.server.url) as tools:
            yield tools.client

    async def grow_to(self, client: Client, n: int) -> None:
        """Define VMs up to ``n`` (tiny, no boot media) and keep 10% of them running."""
        sem = asyncio.Semaphore(4)

        async def one(name: str, start: bool) -> None:
            async with sem:
                await ok(client, "manage_vm", name=name, action="create", arch="x86_64", memory="64M", vcpus=1)
                if start:
                    await ok(client, "manage_vm", name=name, action="start")

        new = [f"bench-{i:03d}" for i in range(len(self.defined), n)]
        want_running = n // 10
        starts = {name for name in new[: max(0, want_running - len(self.running))]}
        await asyncio.gather(*(one(name, name in starts) for name in new))
        self.defined += new
        self.running += sorted(starts)


async def ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    envelope = result.structured_content
    if envelope is None or not envelope.get("success"):
        raise RuntimeError(f"{tool} {arguments} failed: {envelope}")
    return dict(envelope)


# -- 1. list_vms and its floors -----------------------------------------------------------------


async def plain_asyncio_floor(vm_dir: Path, running: list[str], reps: int) -> list[float]:
    """The same work as list_vms, written directly: read every definition, pid file and /proc cmdline
    in a batch off the loop, and query-status on QMP connections kept open (as the server's pool does)."""
    clients: dict[str, QMPClient] = {}
    for name in running:
        qmp = QMPClient(name)
        await asyncio.wait_for(qmp.connect(str(vm_dir / name / "qmp.sock")), 5)
        clients[name] = qmp

    def read_all() -> dict[str, tuple[bytes, bytes | None]]:
        out: dict[str, tuple[bytes, bytes | None]] = {}
        for name in os.listdir(vm_dir):
            if name.startswith("."):
                continue
            d = vm_dir / name
            definition = (d / "vm.json").read_bytes()
            try:
                pid = int((d / "qemu.pid").read_text())
                cmdline: bytes | None = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                cmdline = None
            out[name] = (definition, cmdline)
        return out

    async def one_listing() -> None:
        files = await asyncio.to_thread(read_all)
        rows = [json.loads(raw) for raw, _ in files.values()]
        alive = [name for name, (_, cmdline) in files.items() if cmdline and b"qemu-system" in cmdline]
        await asyncio.gather(*(clients[name].execute("query-status") for name in alive if name in clients))
        assert len(rows) == len(files)

    try:
        return await timed(reps, one_listing)
    finally:
        for qmp in clients.values():
            await qmp.disconnect()


@contextlib.asynccontextmanager
async def noop_server() -> AsyncIterator[Client]:
    """A client of :mod:`benchmarks.noop_server` (the transport floor), killed at exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.noop_server", "--port", str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with open_tools(f"http://127.0.0.1:{port}/mcp") as tools:
                    yield tools.client
                return
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                await asyncio.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()


async def bench_list(b: Bench, sizes: list[int]) -> None:
    r = b.report
    reps = 10 if b.quick else 30
    print("== list_vms: latency over HTTP vs the plain-asyncio floor and the transport floor", flush=True)
    results: dict[str, Any] = b.report.data.setdefault("list_vms", {})
    async with noop_server() as noop:
        transport = summarize(await timed(reps, lambda: noop.call_tool("noop", {})))
    b.report.data["transport_floor"] = transport
    for n in sizes:
        b.start_server()
        try:
            async with b.client() as client:
                began = time.perf_counter()
                await b.grow_to(client, n)
                setup_s = time.perf_counter() - began
                http = summarize(await timed(reps, lambda: ok(client, "list_vms")))
                got = (await ok(client, "list_vms", status="running"))["data"]["vm_count"]
                assert got == len(b.running), (got, len(b.running))
        finally:
            b.stop_server()  # closes the server's QMP connections: QEMU serves one QMP client at a time
        floor = summarize(await plain_asyncio_floor(b.vm_dir, b.running, reps))
        ratio = http["median_ms"] / floor["median_ms"] if floor["median_ms"] else float("nan")
        results[str(n)] = {"running": len(b.running), "http": http, "floor": floor, "setup_s": round(setup_s, 1)}
        r.add(
            f"list_vms, {n} VMs ({len(b.running)} running)",
            fmt(http),
            f"floor {fmt(floor)}; x{ratio:.1f}; no-op tool {fmt(transport)}",
        )


# -- 5. concurrency ------------------------------------------------------------------------------


async def bench_concurrency(b: Bench) -> None:
    print("== 100 concurrent list_vms", flush=True)
    srv = b.start_server()
    try:
        idle = rss_mib(b.pid)
        async with b.client() as client:
            await ok(client, "list_vms")
            peak = 0.0
            lat: list[float] = []

            async def one() -> None:
                nonlocal peak
                began = time.perf_counter()
                await ok(client, "list_vms")
                lat.append(time.perf_counter() - began)
                peak = max(peak, rss_mib(b.pid))

            began = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(100)))
            wall = time.perf_counter() - began
        s = summarize(lat)
        after = rss_mib(b.pid)
        b.report.add(
            f"100 concurrent list_vms ({len(b.defined)} VMs)",
            f"{100 / wall:.0f} calls/s, p95 {s['p95_ms']:.0f} ms",
            f"RSS idle {idle} MiB, peak {peak} MiB, after {after} MiB",
        )
        b.report.data["concurrency"] = {
            "calls": 100,
            "wall_s": round(wall, 3),
            "calls_per_s": round(100 / wall, 1),
            "latency": s,
            "rss_idle_mib": idle,
            "rss_peak_mib": peak,
            "rss_after_mib": after,
            "vms_defined": len(b.defined),
        }
    finally:
        del srv
        b.stop_server()


# -- 2. start and stop ---------------------------------------------------------------------------


async def wait_running_direct(sock: Path, deadline: float) -> None:
    while True:
        qmp = QMPClient("direct")
        try:
            await asyncio.wait_for(qmp.connect(str(sock)), 2)
            while (await qmp.execute("query-status"))["status"] != "running":  # type: ignore[index]
                await asyncio.sleep(0.005)
            return
        except (OSError, EOFError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)
        finally:
            await qmp.disconnect()


async def bench_start(b: Bench) -> None:
    print("== start: manage_vm start vs the same QEMU argv launched directly", flush=True)
    reps = 3 if b.quick else 7
    b.start_server()
    name = "bench-start"
    try:
        async with b.client() as client:
            await ok(client, "manage_vm", name=name, action="create", arch="x86_64", memory="128M", vcpus=1)
            tool: list[float] = []
            argv: list[str] = []
            for _ in range(reps):
                began = time.perf_counter()
                await ok(client, "manage_vm", name=name, action="start")
                tool.append(time.perf_counter() - began)
                argv = json.loads((b.vm_dir / name / "runtime.json").read_text())["argv"]
                await ok(client, "manage_vm", name=name, action="stop", stop_timeout=0)
        b.stop_server()
        direct: list[float] = []
        sock = b.vm_dir / name / "qmp.sock"
        for _ in range(reps):
            began = time.perf_counter()
            subprocess.run(argv, check=True, start_new_session=True)
            await wait_running_direct(sock, time.monotonic() + 30)
            direct.append(time.perf_counter() - began)
            pid = int((b.vm_dir / name / "qemu.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            while Path(f"/proc/{pid}").exists():
                await asyncio.sleep(0.01)
            for leftover in ("qmp.sock", "qemu.pid"):
                (b.vm_dir / name / leftover).unlink(missing_ok=True)
        t, d = summarize(tool), summarize(direct)
        b.report.add(
            "start until running (tiny VM, TCG)",
            fmt(t),
            f"direct argv {fmt(d)}; overhead {t['median_ms'] - d['median_ms']:.0f} ms",
        )
        b.report.data["start"] = {"tool": t, "direct": d, "overhead_ms": round(t["median_ms"] - d["median_ms"], 1)}
    finally:
        b.stop_server()


# -- 4. monitoring --------------------------------------------------------------------------------


async def bench_monitor(b: Bench) -> None:
    samples = 15 if b.quick else 60
    print(f"== monitor: {samples} samples at interval 1; concurrent streams", flush=True)
    b.start_server()
    try:
        async with b.client() as client:
            vm = b.running[0]
            arrivals: list[float] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                arrivals.append(time.monotonic())

            cpu0 = cpu_seconds(b.pid)
            result = await client.call_tool(
                "monitor_vm_status",
                {"name": vm, "interval": 1, "count": samples},
                progress_callback=on_progress,
                read_timeout_seconds=samples + 30,
            )
            cpu1 = cpu_seconds(b.pid)
            envelope = result.structured_content
            assert envelope and envelope["success"], envelope
            drift = (arrivals[-1] - arrivals[0]) - (samples - 1)
            per_sample_ms = (cpu1 - cpu0) / samples * 1000
            lateness = envelope["data"]["max_lateness_s"]
            b.report.add(
                f"monitor drift after {samples} samples (interval 1 s)",
                f"{drift * 1000:+.1f} ms at the client",
                f"server max lateness {lateness * 1000:.1f} ms; target < 50 ms",
            )
            b.report.add("server CPU per sample (all metrics)", f"{per_sample_ms:.2f} ms", "")

            streams = min(50, len(b.running))
            count = 5 if b.quick else 10
            rss0, cpu0 = rss_mib(b.pid), cpu_seconds(b.pid)
            peak = rss0
            began = time.monotonic()

            async def stream(name: str) -> int:
                got = 0

                async def on_p(progress: float, total: float | None, message: str | None) -> None:
                    nonlocal got, peak
                    got += 1
                    peak = max(peak, rss_mib(b.pid))

                res = await client.call_tool(
                    "monitor_vm_status",
                    {"name": name, "interval": 1, "count": count},
                    progress_callback=on_p,
                    read_timeout_seconds=count + 60,
                )
                assert res.structured_content and res.structured_content["success"], res.structured_content
                return got

            got = await asyncio.gather(*(stream(name) for name in b.running[:streams]))
            wall = time.monotonic() - began
            cpu_pct = (cpu_seconds(b.pid) - cpu0) / wall * 100
            b.report.add(
                f"{streams} concurrent monitor streams x {count} samples",
                f"server CPU {cpu_pct:.0f}% of a core",
                f"RSS {rss0} -> peak {peak} MiB; {sum(got)} notifications",
            )
            b.report.data["monitor"] = {
                "samples": samples,
                "drift_ms": round(drift * 1000, 1),
                "server_max_lateness_ms": round(lateness * 1000, 1),
                "cpu_ms_per_sample": round(per_sample_ms, 2),
                "streams": streams,
                "stream_count": count,
                "streams_cpu_pct": round(cpu_pct, 1),
                "streams_rss_mib": [rss0, peak],
                "notifications": sum(got),
            }
    finally:
        b.stop_server()


# -- 3. remote -----------------------------------------------------------------------------------


def ssh_counters(srv: ServerProcess) -> dict[str, int]:
    health = httpx.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5).json()
    return {k: v for k, v in health["ssh"].items() if isinstance(v, int)}


def counted(before: dict[str, int], after: dict[str, int], per: int = 1) -> dict[str, float]:
    keys = ("round_trips", "sftp_requests", "exec_requests", "channels_opened", "connections_opened")
    return {k: round((after.get(k, 0) - before.get(k, 0)) / per, 2) for k in keys}


class DelayProxy:
    """A TCP proxy on loopback that delays every chunk by ``rtt / 2`` in each direction, keeping order:
    a wide-area link for the SSH connection, since this kernel has no netem qdisc."""

    def __init__(self, host: str, port: int, rtt: float) -> None:
        self.host, self.port, self.half = host, port, rtt / 2
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        pumps = [asyncio.create_task(self._pump(reader, up_writer)), asyncio.create_task(self._pump(up_reader, writer))]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        writer.close()
        up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        self._tasks.add(sender)
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.half, data))
        finally:
            queue.put_nowait((0.0, b""))
            await asyncio.gather(sender, return_exceptions=True)


async def bench_remote(b: Bench) -> None:
    """A real sshd on 127.0.0.2 (loopback): first call, warm pooled call, a new connection per call, round trips."""
    print("== remote: list_vms over SSH (sshd on 127.0.0.2) vs local; round trips per call", flush=True)
    reps = 10 if b.quick else 20
    b.root.chmod(0o755)  # the SSH user lives below it
    sshd_root = b.root / "sshd"
    sshd_root.mkdir()
    sshd_root.chmod(0o755)
    sshd = SSHServer(sshd_root, "127.0.0.2", sshd_free_port("127.0.0.2"), password="Pw-" + secrets.token_urlsafe(12))
    sshd.setup()
    sshd.start()
    env = {
        "QEMU_MCP_ACCEL": "tcg",
        "QEMU_MCP_LOG_LEVEL": "WARNING",
        "QEMU_MCP_ALLOWED_ROOTS": str(b.root),
        "QEMU_MCP_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
        "QEMU_MCP_SSH_KEY_DIRS": str(sshd.key_dir),
    }
    remote = {
        "host": sshd.address,
        "ssh_port": sshd.port,
        "ssh_user": sshd.user,
        "ssh_key": str(sshd.key),
        "vm_dir": str(sshd.vm_dir),
    }
    out: dict[str, Any] = {}
    srv = ServerProcess(vm_dir=b.vm_dir, env=env)
    try:
        srv.start()
        async with open_tools(srv.url) as tools:
            c = tools.client
            await ok(c, "list_vms")
            began = time.perf_counter()
            await ok(c, "list_vms", **remote)
            first = time.perf_counter() - began
            local_dir = b.root / "local10"
            local_dir.mkdir()
            here = {"vm_dir": str(local_dir)}
            for i in range(10):  # 10 VMs, 1 running: the same shape on both sides
                await ok(c, "manage_vm", name=f"r{i}", action="create", arch="x86_64", memory="64M", vcpus=1, **remote)
                await ok(c, "manage_vm", name=f"l{i}", action="create", arch="x86_64", memory="64M", vcpus=1, **here)
            await ok(c, "manage_vm", name="r0", action="start", **remote)
            await ok(c, "manage_vm", name="l0", action="start", **here)
            warm = summarize(await timed(reps, lambda: ok(c, "list_vms", **remote)))
            local = summarize(await timed(reps, lambda: ok(c, "list_vms", **here)))
            before = ssh_counters(srv)
            await ok(c, "list_vms", **remote)
            per_list = counted(before, ssh_counters(srv))
            # Per steady-state sample: the difference between 5 and 2 samples (the set-up of a call cancels out),
            # after a first call has filled what the server caches per host.
            await ok(c, "monitor_vm_status", name="r0", interval=1, count=1, **remote)
            before = ssh_counters(srv)
            await ok(c, "monitor_vm_status", name="r0", interval=1, count=2, **remote)
            middle = ssh_counters(srv)
            await ok(c, "monitor_vm_status", name="r0", interval=1, count=5, **remote)
            after = ssh_counters(srv)
            per_sample = {
                k: round(((after.get(k, 0) - middle.get(k, 0)) - (middle.get(k, 0) - before.get(k, 0))) / 3, 2)
                for k in per_list
            }
            await asyncio.sleep(2.5)  # let the direct connection's QMP sessions go idle: the proxy is another identity
            # Real latency on the wire: the same calls through a proxy that delays every byte by RTT/2 each way.
            delayed: dict[str, Any] = {}
            for rtt in (20, 100):
                async with DelayProxy(sshd.address, sshd.port, rtt / 1000) as proxy_port:
                    public = (sshd.conf_dir / "ssh_host_ed25519_key.pub").read_text().split()
                    with sshd.known_hosts.open("a") as known:
                        known.write(f"[{sshd.address}]:{proxy_port} {public[0]} {public[1]}\n")
                    far = {**remote, "ssh_port": proxy_port}
                    began = time.perf_counter()
                    await ok(c, "list_vms", **far)
                    far_first = time.perf_counter() - began
                    far_list = summarize(await timed(3 if b.quick else 7, functools.partial(ok, c, "list_vms", **far)))
                    far_monitor = summarize(
                        await timed(
                            3 if b.quick else 5,
                            functools.partial(ok, c, "monitor_vm_status", name="r0", interval=1, count=1, **far),
                            warmup=1,
                        )
                    )
                delayed[f"rtt_{rtt}ms"] = {
                    "first_ms": round(far_first * 1000, 1),
                    "list_vms": far_list,
                    "monitor_1": far_monitor,
                }
                b.report.add(
                    f"remote at RTT {rtt} ms (delay proxy): list_vms",
                    fmt(far_list),
                    f"first call {far_first * 1000:.0f} ms; monitor count=1 {fmt(far_monitor)}",
                )
            await ok(c, "manage_vm", name="r0", action="stop", stop_timeout=0, **remote)
            await ok(c, "manage_vm", name="l0", action="stop", stop_timeout=0, **here)
        srv.stop()
        # What a naive implementation pays: the same scan over a new SSH connection per call (no HTTP, no
        # MCP: only the SSH part), next to the same scan over one connection kept open (the remote floor).
        argv = scan_argv(str(sshd.vm_dir), [DEFINITION_FILE, RUNTIME_FILE, PID_FILE], PID_FILE)
        command = shlex.join(argv)
        options = {
            "port": sshd.port,
            "username": sshd.user,
            "client_keys": [str(sshd.key)],
            "known_hosts": str(sshd.known_hosts),
            "config": None,
        }

        async def new_connection_per_call() -> None:
            async with asyncssh.connect(sshd.address, **options) as conn:
                await conn.run(command, check=True)

        naive = summarize(await timed(reps, new_connection_per_call))
        async with asyncssh.connect(sshd.address, **options) as kept:
            floor = summarize(await timed(reps, lambda: kept.run(command, check=True)))
    finally:
        srv.stop()
        kill_vms_under(sshd.vm_dir)
        sshd.stop()
    ratio = warm["median_ms"] / local["median_ms"]
    b.report.add("remote list_vms, first call (handshake)", f"{first * 1000:.1f} ms", "")
    b.report.add(
        "remote list_vms, warm via pool (10 VMs, 1 running)",
        fmt(warm),
        f"local {fmt(local)}; x{ratio:.2f}",
    )
    b.report.add(
        "  the SSH part alone: new connection per call (naive)",
        fmt(naive),
        f"same scan on a kept connection {fmt(floor)}",
    )
    b.report.add(
        "SSH round trips per remote list_vms",
        f"{per_list['round_trips']:g}",
        f"sftp requests {per_list['sftp_requests']:g}, exec {per_list['exec_requests']:g}",
    )
    b.report.add(
        "SSH round trips per monitor sample",
        f"{per_sample['round_trips']:g}",
        f"sftp requests {per_sample['sftp_requests']:g}, exec {per_sample['exec_requests']:g}",
    )
    projections = {}
    for rtt in (1, 20, 100):
        projections[f"rtt_{rtt}ms"] = {
            "list_vms_ms": round(warm["median_ms"] + per_list["round_trips"] * rtt, 1),
            "monitor_sample_ms": round(per_sample["round_trips"] * rtt, 1),
            "first_call_extra_ms": round(first * 1000 + 4 * rtt, 1),  # TCP + SSH key exchange + auth: ~4 RTTs
        }
        b.report.add(
            f"projected at RTT {rtt} ms (round trips x RTT + loopback)",
            f"list_vms {projections[f'rtt_{rtt}ms']['list_vms_ms']:.0f} ms",
            f"per monitor sample +{per_sample['round_trips'] * rtt:.0f} ms",
        )
    out.update(
        delayed=delayed,
        first_call_ms=round(first * 1000, 1),
        warm=warm,
        local=local,
        warm_over_local=round(ratio, 2),
        new_connection_per_call_ssh_only=naive,
        kept_connection_ssh_only=floor,
        round_trips_per_list_vms=per_list,
        round_trips_per_monitor_sample=per_sample,
        projections=projections,
    )
    b.report.data["remote"] = out


# -- main ----------------------------------------------------------------------------------------


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and VMs (a smoke run)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"), help="where to write figures")
    parser.add_argument("--sections", default="list,concurrency,start,monitor,remote", help="comma-separated sections")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    if not shutil.which("qemu-system-x86_64"):
        print("qemu-system-x86_64 is not installed (bash scripts/setup.sh)", file=sys.stderr)
        return 2
    report = Report()
    report.data["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
    }
    root = Path(tempfile.mkdtemp(prefix="qmh-bench-", dir="/tmp"))
    bench = Bench(root, report, args.quick)
    sizes = [0, 10, 100] if args.quick else [0, 10, 100, 500]
    try:
        if "list" in sections or "concurrency" in sections or "monitor" in sections:
            if "list" in sections:
                await bench_list(bench, sizes[:3])
            if "concurrency" in sections:
                async with _server(bench) as client:
                    await bench.grow_to(client, max(len(bench.defined), 100))
                await bench_concurrency(bench)
            if "list" in sections and len(sizes) > 3:
                await bench_list(bench, sizes[3:])
            if "monitor" in sections:
                if not bench.running:
                    async with _server(bench) as client:
                        await bench.grow_to(client, 10)
                await bench_monitor(bench)
        if "start" in sections:
            await bench_start(bench)
        if "remote" in sections:
            await bench_remote(bench)
    finally:
        bench.stop_server()
        kill_vms_under(root)
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(report.table())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.data, indent=2) + "\n")
    print(f"\nfigures written to {args.json}")
    return 0


@contextlib.asynccontextmanager
async def _server(b: Bench) -> AsyncIterator[Client]:
    b.start_server()
    try:
        async with b.client() as client:
            yield client
    finally:
        b.stop_server()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
