"""Scenario ``remote``: list_vms and monitor_vm_status over SSH to a real sshd on 127.0.0.2 (first call, warm
through the pool, a new connection per call, SSH round trips per call), and through a proxy that adds latency."""

from __future__ import annotations

import asyncio
import functools
import secrets
import shlex
import time
from typing import Any

import asyncssh
import httpx2 as httpx

from qemu_mcp_http.hosts import scan_argv
from qemu_mcp_http.vm.paths import DEFINITION_FILE, PID_FILE, RUNTIME_FILE
from tests.sshd import SSHServer
from tests.support import ServerProcess, free_port, open_tools

from .harness import Bench, fmt, ok, summarize, timed


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


async def ssh_only(sshd: SSHServer, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """What a naive implementation pays: the same scan over a new SSH connection per call (no HTTP, no MCP: only
    the SSH part), next to the same scan over one connection kept open (the remote floor)."""
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
    return naive, floor


async def bench_remote(b: Bench) -> None:
    """A real sshd on 127.0.0.2 (loopback): first call, warm pooled call, a new connection per call, round trips."""
    print("== remote: list_vms over SSH (sshd on 127.0.0.2) vs local; round trips per call", flush=True)
    reps = 10 if b.quick else 20
    b.root.chmod(0o755)  # the SSH user lives below it
    sshd_root = b.root / "sshd"
    sshd_root.mkdir()
    sshd_root.chmod(0o755)
    sshd = SSHServer(sshd_root, "127.0.0.2", free_port("127.0.0.2"), password="Pw-" + secrets.token_urlsafe(12))
    sshd.setup()
    sshd.start()
    env = {
        "QEMU_MCP_ACCEL": "tcg",
        "QEMU_MCP_LOG_LEVEL": "WARNING",
        "QEMU_MCP_ALLOWED_ROOTS": str(b.root),
        "QEMU_MCP_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
        "QEMU_MCP_SSH_KEY_DIRS": str(sshd.key_dir),
        # The calls log in to the sshd's address with the server's key, not through a named host.
        "QEMU_MCP_ALLOW_CLIENT_SSH_KEYS": "1",
    }
    remote = {
        "host": sshd.address,
        "ssh_port": sshd.port,
        "ssh_user": sshd.user,
        "ssh_key": str(sshd.key),
        "vm_dir": str(sshd.vm_dir),
    }
    out: dict[str, Any] = {}
    try:
        # The remote VMs (under sshd.vm_dir) are killed by PID at the end; the bench's own ones live on.
        with ServerProcess(vm_dir=b.vm_dir, env=env, reap_under=sshd.vm_dir) as srv:
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
                    await ok(
                        c, "manage_vm", name=f"r{i}", action="create", arch="x86_64", memory="64M", vcpus=1, **remote
                    )
                    await ok(
                        c, "manage_vm", name=f"l{i}", action="create", arch="x86_64", memory="64M", vcpus=1, **here
                    )
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
                await asyncio.sleep(
                    2.5
                )  # let the direct connection's QMP sessions go idle: the proxy is another identity
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
                        far_list = summarize(
                            await timed(3 if b.quick else 7, functools.partial(ok, c, "list_vms", **far))
                        )
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
        naive, floor = await ssh_only(sshd, reps)
    finally:
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
