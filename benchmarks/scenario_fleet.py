"""Scenario ``fleet``: many hosts and many server processes.

* ``list_vms host="*"`` over 10 named SSH hosts (10 real sshd on 127.0.0.1, each with its own port, user and
  vm_dir) holding 100 VM definitions each (one VM made for real per host, its vm.json copied under 99 more names),
  1000 VMs in all, the local machine left out (``QEMU_MCP_ALL_HOSTS_EXCLUDE_LOCAL=1``): the first call (10 SSH
  handshakes at once) and warm calls, beside one host's warm ``list_vms host="h1"``. Targets: the fleet call
  within 1.5x one host's (the hosts asked at once, not one after the other), and 1000 VMs under 300 ms warm.
  Where its time goes: the same 1000 definitions in one vm_dir of one host (the work without the fan-out), each
  host's own seconds (``data.hosts``), the server's and this client's CPU per call, SSH round trips, the
  answer's size. Every sshd shares the machine's 2 cores with the server: the 10 scans are not on 10 machines.
* The same at RTT 20 and 100 ms: every host behind a proxy that delays each byte (``@rtt<N>`` groups).
* 100 concurrent ``list_vms`` (100 VMs, 10 running: the ``concurrency`` section's shape; and 100 stopped VMs,
  no QMP) against one replica directly, one replica behind HAProxy (deploy/haproxy.cfg, both its servers
  pointed at that replica) and two replicas behind it (stateless, Redis, a shared secret; one vm_dir), in
  rounds taking turns: calls/s and p95, where the CPU goes (replicas, this client, HAProxy), and the running
  VMs answered ``unresponsive``. One replica is CPU-bound at 64-72 calls/s (README); on 2 cores a second
  replica has little to gain, since this client and HAProxy need CPU too, and a running VM's QMP socket
  serves one process at a time: the replicas take turns on it.

Every sshd and its connections are killed by PID and its user deleted at the end (with whatever still runs as
it, by PID); the replicas, Redis and HAProxy are killed by PID; no QEMU runs on the SSH hosts (the bench's own
QEMUs are killed by the harness).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import pwd
import secrets
import shutil
import signal
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mcp import Client

from qemu_mcp_http.vm.paths import DEFINITION_FILE
from qemu_mcp_http.vm.qmp import QMP_IDLE_SECONDS
from tests.replicas import REPLICA_NAMES, LoadBalancer, Recorder, Redis, lb_client
from tests.sshd import SSHServer
from tests.support import ServerProcess, free_port, open_tools

from .harness import Bench, cpu_seconds, fmt, ok, summarize, timed
from .scenario_remote import DelayProxy, counted, ssh_counters

HOSTS = 10
VMS_PER_HOST = 100
CALLS = 100


# -- 10 SSH hosts, 1000 VMs --------------------------------------------------------------------------


def _drop_user(user: str) -> None:
    """Kill what still runs as the test user, by PID, then delete the user (as the sshd fixture's teardown)."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            line = next(x for x in status.read_text().splitlines() if x.startswith("Uid:"))
            if int(line.split()[1]) == uid:
                os.kill(int(status.parent.name), signal.SIGKILL)
    subprocess.run(["userdel", user], check=False, capture_output=True)


def _fill(sshd: SSHServer, source: Path, target: Path, names: list[str]) -> None:
    """Definitions named ``names`` in ``target``: the real VM ``source``'s vm.json under other names, owned by
    the host's user (list_vms reads the definitions only)."""
    definition = json.loads((source / DEFINITION_FILE).read_text())
    mode = source.stat().st_mode & 0o7777
    for name in names:
        directory = target / name
        directory.mkdir(mode=mode)
        directory.chmod(mode)
        (directory / DEFINITION_FILE).write_text(json.dumps({**definition, "name": name}, indent=2) + "\n")
        for path in (directory, directory / DEFINITION_FILE):
            shutil.chown(path, sshd.user, sshd.user)


def _start_hosts(root: Path, sshds: list[SSHServer]) -> None:
    """:data:`HOSTS` sshd on 127.0.0.1, each with its own port, user, keys and vm_dir (appended to ``sshds`` as
    they come, so that the caller stops and deletes whatever was made)."""
    for i in range(1, HOSTS + 1):
        home = root / f"h{i}"
        home.mkdir()
        home.chmod(0o755)
        sshd = SSHServer(home, "127.0.0.1", free_port("127.0.0.1"), password="Pw-" + secrets.token_urlsafe(12))
        sshds.append(sshd)  # before setup: its user goes at the end whatever happens
        sshd.setup()
        sshd.start()


def _entry(sshd: SSHServer, port: int | None = None) -> dict[str, Any]:
    return {
        "address": sshd.address,
        "port": port or sshd.port,
        "user": sshd.user,
        "key": str(sshd.key),
        "vm_dir": str(sshd.vm_dir),
    }


def _server_env(root: Path, sshds: list[SSHServer], hosts_file: Path, known_hosts: Path) -> dict[str, str]:
    return {
        "QEMU_MCP_ACCEL": "tcg",
        "QEMU_MCP_LOG_LEVEL": "WARNING",
        "QEMU_MCP_ALLOWED_ROOTS": str(root),
        "QEMU_MCP_SSH_HOSTS_FILE": str(hosts_file),
        "QEMU_MCP_SSH_KNOWN_HOSTS": str(known_hosts),
        "QEMU_MCP_SSH_KEY_DIRS": ",".join(str(s.key_dir) for s in sshds),
        "QEMU_MCP_ALL_HOSTS_EXCLUDE_LOCAL": "1",
    }


async def _list(client: Client, **arguments: Any) -> dict[str, Any]:
    return await ok(client, "list_vms", **arguments)


async def _delayed(b: Bench, root: Path, sshds: list[SSHServer], rtts: tuple[int, ...]) -> dict[str, Any]:
    """The fleet call and one host's, every host behind a proxy that delays each byte by RTT/2 each way
    (``@rtt<N>``: the same 10 hosts at that RTT), on a server of its own."""
    reps = 3 if b.quick else 7
    out: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as proxies:
        hosts: dict[str, Any] = {"groups": {}}
        lines: list[str] = []
        for rtt in rtts:
            members = []
            for i, sshd in enumerate(sshds, 1):
                port = await proxies.enter_async_context(DelayProxy(sshd.address, sshd.port, rtt / 1000))
                name = f"h{i}-rtt{rtt}"
                hosts[name] = _entry(sshd, port)
                members.append(name)
                public = (sshd.conf_dir / "ssh_host_ed25519_key.pub").read_text().split()
                lines.append(f"[{sshd.address}]:{port} {public[0]} {public[1]}\n")
            hosts["groups"][f"rtt{rtt}"] = members
        (root / "hosts-delayed.json").write_text(json.dumps(hosts, indent=2))
        (root / "known_hosts-delayed").write_text("".join(lines))
        env = _server_env(root, sshds, root / "hosts-delayed.json", root / "known_hosts-delayed")
        with ServerProcess(vm_dir=root / "local-vms", env=env, reap_under=root) as srv:
            async with open_tools(srv.url) as tools:
                c = tools.client
                for rtt in rtts:
                    t0 = time.perf_counter()
                    await _list(c, host=f"@rtt{rtt}")
                    first = time.perf_counter() - t0
                    fleet = summarize(await timed(reps, functools.partial(_list, c, host=f"@rtt{rtt}")))
                    single = summarize(await timed(reps, functools.partial(_list, c, host=f"h1-rtt{rtt}")))
                    ratio = fleet["median_ms"] / single["median_ms"]
                    b.report.add(
                        f"fleet list_vms at RTT {rtt} ms (a delay proxy per host)",
                        fmt(fleet),
                        f"one host {fmt(single)}; x{ratio:.2f}; first call {first * 1000:.0f} ms",
                    )
                    out[f"rtt_{rtt}ms"] = {
                        "fleet": fleet,
                        "single": single,
                        "fleet_over_single": round(ratio, 2),
                        "fleet_first_ms": round(first * 1000, 1),
                    }
    return out


async def bench_fleet_hosts(b: Bench) -> None:
    print(f"== fleet: list_vms host='*' over {HOSTS} SSH hosts x {VMS_PER_HOST} VMs", flush=True)
    reps = 10 if b.quick else 20
    total = HOSTS * VMS_PER_HOST
    b.root.chmod(0o755)  # the SSH users live below it
    root = b.root / "fleet"
    root.mkdir()
    root.chmod(0o755)
    (root / "local-vms").mkdir()
    sshds: list[SSHServer] = []
    out: dict[str, Any] = {"hosts": HOSTS, "vms_per_host": VMS_PER_HOST}
    try:
        began = time.perf_counter()
        _start_hosts(root, sshds)
        names = [f"h{i}" for i in range(1, HOSTS + 1)]
        hosts: dict[str, Any] = {name: _entry(s) for name, s in zip(names, sshds, strict=True)}
        hosts["groups"] = {"fleet": names}
        (root / "hosts.json").write_text(json.dumps(hosts, indent=2))
        (root / "known_hosts").write_text("".join(s.known_hosts.read_text() for s in sshds))
        env = _server_env(root, sshds, root / "hosts.json", root / "known_hosts")
        # One VM per host made for real, by a server of its own (the measured ones start without connections).
        with ServerProcess(vm_dir=root / "local-vms", env=env, reap_under=root) as srv:
            async with open_tools(srv.url) as tools:
                tiny = {"action": "create", "arch": "x86_64", "memory": "64M", "vcpus": 1, "disk": "size=16M"}
                await asyncio.gather(*(ok(tools.client, "manage_vm", host=h, name="vm-000", **tiny) for h in names))
        for sshd in sshds:
            _fill(sshd, sshd.vm_dir / "vm-000", sshd.vm_dir, [f"vm-{i:03d}" for i in range(1, VMS_PER_HOST)])
        # The baseline of the same work without the fan-out: all 1000 definitions in one vm_dir of h1.
        big = sshds[0].root / "big"
        big.mkdir()
        shutil.chown(big, sshds[0].user, sshds[0].user)
        _fill(sshds[0], sshds[0].vm_dir / "vm-000", big, [f"vm-{i:04d}" for i in range(total)])
        setup_s = time.perf_counter() - began

        # The first call of a single host, on a server of its own (one SSH handshake).
        with ServerProcess(vm_dir=root / "local-vms", env=env, reap_under=root) as srv:
            async with open_tools(srv.url) as tools:
                await _list(tools.client, host="localhost")  # warmed as the fleet's below
                t0 = time.perf_counter()
                await _list(tools.client, host="h1")
                single_first = time.perf_counter() - t0

        with ServerProcess(vm_dir=root / "local-vms", env=env, reap_under=root) as srv:
            assert srv.proc is not None
            pid = srv.proc.pid
            async with open_tools(srv.url) as tools:
                c = tools.client
                await _list(c, host="localhost")  # the MCP session and the server's imports, warmed
                t0 = time.perf_counter()
                first = await _list(c, host="*")
                fleet_first = time.perf_counter() - t0
                data = first["data"]
                failed = [h for h in data["hosts"] if not h["success"]]
                if data["vm_count"] != total or failed:
                    raise RuntimeError(f"fleet list_vms: {data['vm_count']} VMs, failed hosts {failed}")
                first_hosts = {h["host"]: h["seconds"] for h in data["hosts"]}

                answers: list[dict[str, Any]] = []

                async def fleet() -> None:
                    answers.append(await _list(c, host="*"))

                cpu0, mine0 = cpu_seconds(pid), time.process_time()
                fleet_warm = summarize(await timed(reps, fleet))
                fleet_cpu = (cpu_seconds(pid) - cpu0) / (reps + 2)
                fleet_client_cpu = (time.process_time() - mine0) / (reps + 2)

                cpu0, mine0 = cpu_seconds(pid), time.process_time()
                single_warm = summarize(await timed(reps, functools.partial(_list, c, host="h1")))
                single_cpu = (cpu_seconds(pid) - cpu0) / (reps + 2)
                single_client_cpu = (time.process_time() - mine0) / (reps + 2)

                one_dir = functools.partial(_list, c, host="h1", vm_dir=str(big))
                if (await one_dir())["data"]["vm_count"] != total:
                    raise RuntimeError(f"h1 {big}: not {total} VMs")
                cpu0 = cpu_seconds(pid)
                same_work = summarize(await timed(max(3, reps // 2), one_dir))
                same_work_cpu = (cpu_seconds(pid) - cpu0) / (max(3, reps // 2) + 2)

                group = summarize(await timed(max(3, reps // 2), functools.partial(_list, c, host="@fleet")))
                before = ssh_counters(srv)
                sized = await _list(c, host="*")
                per_fleet = counted(before, ssh_counters(srv))
                before = ssh_counters(srv)
                await _list(c, host="h1")
                per_single = counted(before, ssh_counters(srv))
                result = await c.call_tool("list_vms", {"host": "*"})
                text_bytes = sum(len(getattr(part, "text", "")) for part in result.content)
                structured_bytes = len(json.dumps(sized, separators=(",", ":")))
        # Inside the warm fleet calls: each host's own time, and the slowest one (the call waits for it).
        slowest = [max(h["seconds"] for h in a["data"]["hosts"]) for a in answers]
        every = [h["seconds"] for a in answers for h in a["data"]["hosts"]]
        delayed = await _delayed(b, root, sshds, (20, 100))
    finally:
        for sshd in sshds:
            with contextlib.suppress(Exception):
                sshd.stop()
            _drop_user(sshd.user)

    ratio = fleet_warm["median_ms"] / single_warm["median_ms"]
    slowest_ms = statistics.median(slowest) * 1000
    host_ms = statistics.median(every) * 1000
    b.report.add(
        f"fleet list_vms host='*', {HOSTS} SSH hosts x {VMS_PER_HOST} VMs",
        fmt(fleet_warm),
        f"one host (h1, {VMS_PER_HOST} VMs) {fmt(single_warm)}; x{ratio:.2f} (target <= 1.5x; sum of {HOSTS}: "
        f"{single_warm['median_ms'] * HOSTS:.0f} ms)",
    )
    b.report.add(
        f"  {total} VMs under 300 ms warm",
        "met" if fleet_warm["median_ms"] < 300 else "not met",
        f"median {fleet_warm['median_ms']:.0f} ms, p95 {fleet_warm['p95_ms']:.0f} ms",
    )
    b.report.add(
        f"  the same {total} VMs in one vm_dir of one host",
        fmt(same_work),
        f"server CPU {same_work_cpu * 1000:.0f} ms/call (the fan-out's: {fleet_cpu * 1000:.0f})",
    )
    b.report.add(
        f"fleet list_vms first call ({HOSTS} SSH handshakes at once)",
        f"{fleet_first * 1000:.0f} ms",
        f"one host's first call {single_first * 1000:.0f} ms; slowest host {max(first_hosts.values()) * 1000:.0f} ms",
    )
    b.report.add(
        "  inside a warm fleet call: slowest host / a host",
        f"{slowest_ms:.0f} ms / {host_ms:.0f} ms",
        f"the rest ({fleet_warm['median_ms'] - slowest_ms:.0f} ms): {total} rows to JSON, HTTP, client",
    )
    b.report.add(
        "  CPU per call: server / this client",
        f"fleet {fleet_cpu * 1000:.0f} / {fleet_client_cpu * 1000:.0f} ms",
        f"one host {single_cpu * 1000:.0f} / {single_client_cpu * 1000:.0f} ms",
    )
    b.report.add(
        "  SSH round trips per fleet call",
        f"{per_fleet['round_trips']:g}",
        f"one host {per_single['round_trips']:g}; answer {structured_bytes / 1024:.0f} KiB structured "
        f"+ {text_bytes / 1024:.0f} KiB text",
    )
    b.report.add("fleet list_vms host='@fleet' (the same 10 hosts)", fmt(group))
    out.update(
        setup_s=round(setup_s, 1),
        fleet_first_ms=round(fleet_first * 1000, 1),
        fleet_first_host_seconds=first_hosts,
        single_first_ms=round(single_first * 1000, 1),
        fleet_warm=fleet_warm,
        single_warm=single_warm,
        same_vms_one_vm_dir=same_work,
        group_warm=group,
        fleet_over_single=round(ratio, 2),
        under_300ms=fleet_warm["median_ms"] < 300,
        slowest_host_in_call_ms=round(slowest_ms, 1),
        host_in_call_ms=round(host_ms, 1),
        server_cpu_ms_per_call={
            "fleet": round(fleet_cpu * 1000, 1),
            "single": round(single_cpu * 1000, 1),
            "same_vms_one_vm_dir": round(same_work_cpu * 1000, 1),
        },
        client_cpu_ms_per_call={
            "fleet": round(fleet_client_cpu * 1000, 1),
            "single": round(single_client_cpu * 1000, 1),
        },
        ssh_per_call={"fleet": per_fleet, "single": per_single},
        answer_bytes={"structured": structured_bytes, "text": text_bytes},
        delayed=delayed,
    )
    b.report.data.setdefault("fleet", {})["hosts"] = out


# -- replicas ----------------------------------------------------------------------------------------

#: Before each round of calls: the replicas' idle QMP connections close (QEMU serves one QMP client at a time, so
#: a connection left by the round before would hold up the next round's replica), and every kept-alive HTTP
#: connection is well past uvicorn's keep-alive timeout (5 s; httpx's expiry is 5 s too). A connection reused
#: just as uvicorn closes it (directly, or by HAProxy towards a replica: HAProxy then drops the client's
#: connection without an answer) ends the MCP client's whole session: seen here with gaps of 4.6-4.8 s.
PAUSE_S = max(QMP_IDLE_SECONDS, 5.0) + 1.0
#: The ways to the replicas, and what the report calls them.
WAYS = {"direct": "1 replica, direct", "lb-1": "1 replica behind HAProxy", "lb-2": "2 replicas behind HAProxy"}


async def _burst(client: Client, calls: int, arguments: dict[str, Any]) -> tuple[float, list[float], int]:
    """``calls`` list_vms at once: the wall time, each call's latency, and the running VMs the answers called
    ``unresponsive`` (no QMP session in time)."""
    lat: list[float] = []
    unresponsive = 0

    async def one() -> None:
        nonlocal unresponsive
        t0 = time.perf_counter()
        answer = await ok(client, "list_vms", **arguments)
        lat.append(time.perf_counter() - t0)
        unresponsive += sum(vm.get("run_state") == "unresponsive" for vm in answer["data"]["vms"])

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    return time.perf_counter() - t0, lat, unresponsive


class _Config:
    """One way to the replicas and one vm_dir, measured over rounds of :data:`CALLS` concurrent calls."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.arguments = arguments
        self.rates: list[float] = []
        self.latencies: list[float] = []
        self.replica_cpu: dict[str, float] = {}
        self.client_cpu = 0.0
        self.lb_cpu = 0.0
        self.calls = 0
        self.served: Counter[str] = Counter()
        self.unresponsive = 0

    async def round(self, client: Client, recorder: Recorder, pids: dict[str, int], lb_pid: int | None) -> None:
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        lb0 = cpu_seconds(lb_pid) if lb_pid else 0.0
        mine0 = time.process_time()
        seen = len(recorder.hops)
        wall, lat, unresponsive = await _burst(client, CALLS, self.arguments)
        self.client_cpu += time.process_time() - mine0
        self.lb_cpu += (cpu_seconds(lb_pid) - lb0) if lb_pid else 0.0
        for name, pid in pids.items():
            self.replica_cpu[name] = self.replica_cpu.get(name, 0.0) + cpu_seconds(pid) - before[name]
        self.served.update(h.served_by or "direct" for h in recorder.hops[seen:] if h.tool == "list_vms")
        self.unresponsive += unresponsive
        self.rates.append(CALLS / wall)
        self.latencies += lat
        self.calls += CALLS

    def figures(self) -> dict[str, Any]:
        per = 1000 / self.calls
        return {
            "calls_per_s_median": round(statistics.median(self.rates), 1),
            "calls_per_s_rounds": [round(r, 1) for r in self.rates],
            "latency": summarize(self.latencies),
            "cpu_ms_per_call": {
                **{name: round(cpu * per, 2) for name, cpu in sorted(self.replica_cpu.items())},
                "client": round(self.client_cpu * per, 2),
                "haproxy": round(self.lb_cpu * per, 2),
            },
            "served": dict(self.served),
            "unresponsive_rows": self.unresponsive,
        }


def _stopped_copies(b: Bench, target: Path, count: int) -> None:
    """``count`` definitions in ``target``: a stopped VM's vm.json of the bench under other names."""
    source = b.vm_dir / next(name for name in reversed(b.defined) if name not in b.running) / DEFINITION_FILE
    definition = json.loads(source.read_text())
    for i in range(count):
        name = f"idle-{i:03d}"
        (target / name).mkdir(parents=True)
        (target / name / DEFINITION_FILE).write_text(json.dumps({**definition, "name": name}, indent=2) + "\n")


async def bench_fleet_replicas(b: Bench) -> None:
    # 100 VMs (10 running) in the bench's vm_dir, made by a server of its own; the replicas share that vm_dir.
    async with b.serving(), b.client() as client:
        await b.grow_to(client, max(len(b.defined), 100))
    print(f"== fleet: {CALLS} concurrent list_vms, 1 replica vs 2 behind HAProxy ({len(b.defined)} VMs)", flush=True)
    rounds = 2 if b.quick else 5
    root = b.root / "replicas"
    root.mkdir()
    secret = root / "shared-secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    # The same calls over 100 stopped VMs: no QMP, only the work that CPUs share.
    stopped = root / "stopped-vms"
    _stopped_copies(b, stopped, 100)
    kinds = {"running": {}, "stopped": {"vm_dir": str(stopped)}}
    configs = {(way, kind): _Config(arguments) for way in WAYS for kind, arguments in kinds.items()}
    with contextlib.ExitStack() as stack:
        redis = Redis(root / "redis")
        stack.callback(redis.stop)
        redis.start()
        servers: dict[str, ServerProcess] = {}
        for name in REPLICA_NAMES:
            srv = ServerProcess(
                vm_dir=b.vm_dir,
                env={
                    "QEMU_MCP_ACCEL": "tcg",
                    "QEMU_MCP_LOG_LEVEL": "WARNING",
                    "QEMU_MCP_ALLOWED_ROOTS": str(b.root),
                    "QEMU_MCP_STATELESS": "1",
                    "QEMU_MCP_REDIS_URL": redis.url,
                    "QEMU_MCP_SHARED_SECRET_FILE": str(secret),
                    "QEMU_MCP_QMP_IDLE_HOLD": "0.05",  # as deploy/compose.replicas.yaml
                    "QEMU_MCP_WATCH_INTERVAL": "3600",
                },
            )
            # Stopped by PID, never reaped: the bench's QEMUs live on for the sections after this one.
            stack.callback(srv.stop)
            srv.start()
            servers[name] = srv
        pids = {name: s.proc.pid for name, s in servers.items() if s.proc is not None}
        first = REPLICA_NAMES[0]
        # deploy/haproxy.cfg in front of both replicas, and the same file with both of its servers pointed at
        # the first replica (one replica behind HAProxy: the same hop, without killing anything).
        balancers = {
            "lb-2": LoadBalancer(root / "haproxy-2", {name: s.port for name, s in servers.items()}),
            "lb-1": LoadBalancer(root / "haproxy-1", dict.fromkeys(REPLICA_NAMES, servers[first].port)),
        }
        for lb in balancers.values():
            stack.callback(lb.stop)
            lb.start()
        ways = {
            "direct": (servers[first].url, {first: pids[first]}, None),
            "lb-1": (balancers["lb-1"].url, {first: pids[first]}, balancers["lb-1"].proc),
            "lb-2": (balancers["lb-2"].url, pids, balancers["lb-2"].proc),
        }
        async with contextlib.AsyncExitStack() as clients:
            opened: dict[str, tuple[Client, Recorder]] = {}
            for way, (url, _, _) in ways.items():
                recorder = Recorder()
                opened[way] = (await clients.enter_async_context(lb_client(url, recorder)), recorder)
                for arguments in kinds.values():
                    await ok(opened[way][0], "list_vms", **arguments)
            # Rounds taking turns, in a rotating order: the machine's other load falls on each alike.
            order = list(configs)
            for i in range(rounds):
                for way, kind in order[i % len(order) :] + order[: i % len(order)]:
                    await asyncio.sleep(PAUSE_S)
                    _, round_pids, proc = ways[way]
                    client, recorder = opened[way]
                    await configs[way, kind].round(client, recorder, round_pids, proc.pid if proc else None)
    figures = {kind: {way: configs[way, kind].figures() for way in WAYS} for kind in kinds}
    for kind, label in (("running", "10 of 100 running"), ("stopped", "100 stopped")):
        one = figures[kind]["direct"]["calls_per_s_median"]
        for way, what in WAYS.items():
            f = figures[kind][way]
            cpu = f["cpu_ms_per_call"]
            replicas_cpu = " + ".join(f"{cpu[n]:.1f}" for n in REPLICA_NAMES if n in cpu)
            gain = f"x{f['calls_per_s_median'] / one:.2f} of direct; " if way != "direct" else ""
            if way == "direct" and kind == "running":
                gain = "README: 64-72 calls/s; "
            b.report.add(
                f"{CALLS} concurrent list_vms ({label}): {what}",
                f"{f['calls_per_s_median']:.0f} calls/s, p95 {f['latency']['p95_ms']:.0f} ms",
                f"{gain}CPU/call: replica {replicas_cpu}, client {cpu['client']:.1f}, haproxy {cpu['haproxy']:.1f} ms",
            )
    split = figures["running"]["lb-2"]["served"]
    b.report.add(
        "  2 replicas: calls served by each (10 running)",
        " / ".join(f"{split.get(n, 0)}" for n in REPLICA_NAMES),
        f"{os.cpu_count()} CPUs: the replicas, this client and HAProxy share them",
    )
    b.report.add(
        "  running VMs answered 'unresponsive' (QMP)",
        " / ".join(f"{figures['running'][way]['unresponsive_rows']}" for way in WAYS),
        "direct / 1 replica behind HAProxy / 2 replicas, in all calls",
    )
    b.report.data.setdefault("fleet", {})["replicas"] = {
        "calls_per_round": CALLS,
        "rounds": rounds,
        "vms_defined": len(b.defined),
        "vms_running": len(b.running),
        "cpus": os.cpu_count(),
        **figures,
    }


async def bench_fleet(b: Bench) -> None:
    await bench_fleet_hosts(b)
    await bench_fleet_replicas(b)
