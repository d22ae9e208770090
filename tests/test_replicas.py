"""Replicas behind a round-robin load balancer (issue 17), for real: HAProxy with deploy/haproxy.cfg, two
``qemu-mcp-http`` processes sharing one vm_dir, Redis (``QEMU_MCP_REDIS_URL``), a secret
(``QEMU_MCP_SHARED_SECRET_FILE``) and stateless mode (``QEMU_MCP_STATELESS=1``), real QEMU guests, and the
real Python MCP client talking to the load balancer's address (fixtures: tests/replicas.py).

What is proved, and how:

* HAProxy balances every request, not every connection: one keep-alive TCP connection's requests alternate.
* A 2026-07-28 client's calls alternate between the replicas through a whole VM lifecycle (create, start,
  console wait, monitor with progress, stop, delete): HAProxy's ``X-Served-By`` on each response, and each
  replica's ``qemu_mcp_tool_calls_total``; progress events arrive one by one (the SSE response is not
  buffered by HAProxy) on the replica the monitor call landed on.
* A handshake-revision client (``mode="legacy"``, 2025-11-25) works through the round robin: no session.
* A ``subscriptions/listen`` stream held by one replica hears changes made through the other replica: the
  event crosses through Redis (the replicas' rescan of the vm_dir is slowed to an hour so that nothing else
  could carry it).
* A web console link signed by one replica opens on the other, and its WebSocket works through HAProxy.
* Elicitation on 2026-07-28: the first round and the retry (with its sealed ``request_state``) land on
  different replicas, and the delete goes through.
* SIGKILL of a replica in the middle of a call (a start waiting for the guest agent; a create holding the
  VM's lock) loses no VM and no definition; the per-VM ``flock`` keeps the other replica out while the
  holder lives and lets it in once the holder dies; HAProxy retries refused connections on the survivor and
  marks the dead replica down; the replica is restarted so that both serve again.
* The alternative to stateless mode, sticky sessions (the ``stick`` lines of deploy/haproxy.cfg uncommented,
  replicas of their own without ``QEMU_MCP_STATELESS``): a 2025 client's session stays on one replica and
  keeps elicitation and notifications.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
import pytest
import websockets
from mcp.server.subscriptions import ResourceUpdated
from mcp_types import ElicitRequestParams, ElicitResult, ResourceUpdatedNotification
from websockets.asyncio.client import connect as ws_connect

from .guest_image import READY_MARKER, GuestISOs
from .replicas import (
    REPLICA_NAMES,
    SLOW_CREATE_VM,
    Recorder,
    Replicas,
    cluster,
    lb_client,
    lock_holder,
    replicas,
    sticky_config,
)
from .support import ToolClient, kill_groups, kill_vms_under, open_tools, pids_running, wait_for

__all__ = ["replicas"]  # the module fixture, imported to be found

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 120
EVENT_TIMEOUT = 15.0


def alternating(served: list[str | None]) -> bool:
    """Both replicas, never the same one twice in a row."""
    return set(served) == set(REPLICA_NAMES) and all(a != b for a, b in itertools.pairwise(served))


def delta(after: Counter[tuple[str, str]], before: Counter[tuple[str, str]]) -> Counter[tuple[str, str]]:
    return Counter({key: after[key] - before[key] for key in after if after[key] != before[key]})


async def all_tool_calls(replicas: Replicas) -> dict[str, Counter[tuple[str, str]]]:
    return {name: await replicas.tool_calls(name) for name in REPLICA_NAMES}


async def both_up(replicas: Replicas) -> None:
    """Each test starts with both replicas serving (a failed test before may have left one dead)."""
    await asyncio.to_thread(replicas.ensure_both_up)


async def create_small(tools: ToolClient, name: str, **extra: Any) -> None:
    """A VM without a guest OS: QEMU runs (firmware only), which is all a start/stop needs."""
    await tools.ok("manage_vm", name=name, action="create", arch="x86_64", memory="64M", disk="size=16M", **extra)


async def create_guest(tools: ToolClient, name: str, guest_isos: GuestISOs) -> None:
    """A VM booting the busybox test guest (prints READY_MARKER on its serial console, runs the agent)."""
    await tools.ok("manage_vm", name=name, action="create", arch="x86_64", memory="256M", vcpus=1, disk="size=16M",
                   iso=str(guest_isos.amd64))  # fmt: skip


def test_each_request_of_one_connection_is_balanced(replicas: Replicas) -> None:
    """HAProxy in its default keep-alive mode balances per request: six requests on ONE client TCP connection
    (the same socket throughout, answered HTTP/1.1 keep-alive) alternate between the replicas."""
    url = urlsplit(replicas.lb.base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    served = []
    try:
        conn.connect()
        sock = conn.sock
        local = sock.getsockname()
        for _ in range(6):
            conn.request("GET", "/healthz", headers={"Host": f"127.0.0.1:{url.port}"})
            answer = conn.getresponse()
            body = json.loads(answer.read())
            assert answer.status == 200 and body["status"] == "ok", body
            assert answer.getheader("Connection", "").lower() != "close"
            served.append(answer.getheader("X-Served-By"))
            assert conn.sock is sock and sock.getsockname() == local  # still the same connection
    finally:
        conn.close()
    assert alternating(served), served
    assert replicas.lb.states() == {name: "UP" for name in REPLICA_NAMES}


async def test_calls_alternate_replicas_through_a_vm_lifecycle(replicas: Replicas, guest_isos: GuestISOs) -> None:
    """The default client (mode "auto", which ends on 2026-07-28) through HAProxy: create, start, wait for the
    guest on its serial console, monitor it (3 samples, each a progress notification), stop and delete. Every
    request alternates between the replicas; each replica counts the tool calls it served."""
    await both_up(replicas)
    name = "rr-life"
    before = await all_tool_calls(replicas)
    recorder = Recorder()
    arrivals: list[tuple[float, float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append((time.monotonic(), progress, total, message))

    try:
        async with lb_client(replicas.url, recorder) as client:
            assert client.protocol_version == "2026-07-28"
            tools = ToolClient(client)
            await create_guest(tools, name, guest_isos)
            await tools.ok("manage_vm", name=name, action="start")
            ready = await tools.ok("vm_console", name=name, action="wait", pattern=READY_MARKER, offset=0,
                                   timeout=BOOT_TIMEOUT)  # fmt: skip
            assert ready["data"]["offset"] >= 0
            listed = await tools.ok("list_vms", filter_name=name)
            assert listed["data"]["vms"][0]["status"] == "running"

            monitored = await client.call_tool(
                "monitor_vm_status", {"name": name, "count": 3, "interval": 1}, progress_callback=on_progress
            )
            ended = time.monotonic()
            envelope = monitored.structured_content
            assert envelope is not None and envelope["success"], monitored
            assert len(envelope["data"]["metrics_data"]) == 3
            # One monitor call, one HTTP exchange: the samples came on the replica it landed on ...
            (monitor_hop,) = [h for h in recorder.hops if h.tool == "monitor_vm_status"]
            assert monitor_hop.served_by in REPLICA_NAMES and monitor_hop.status == 200
            # ... one by one, as they were taken (HAProxy does not hold back an SSE response).
            assert [(p, t) for _, p, t, _ in arrivals] == [(1, 3), (2, 3), (3, 3)], arrivals
            assert [json.loads(m or "") for *_, m in arrivals] == envelope["data"]["metrics_data"]
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
            assert all(gap > 0.5 for gap in gaps) and ended - arrivals[0][0] > 1.2, (gaps, ended - arrivals[0][0])

            await tools.ok("manage_vm", name=name, action="stop")
            await tools.ok("manage_vm", name=name, action="delete")
            assert not (replicas.vm_dir / name).exists()
    finally:
        kill_vms_under(replicas.vm_dir / name)

    served = recorder.served()
    assert alternating(served), [(h.rpc, h.tool, h.served_by) for h in recorder.hops]
    calls = recorder.served("tools/call")
    assert len(calls) == 7
    after = await all_tool_calls(replicas)
    counted = {name: sum(delta(after[name], before[name]).values()) for name in REPLICA_NAMES}
    assert counted == {name: calls.count(name) for name in REPLICA_NAMES}, (counted, calls)
    assert all(counted[name] >= 3 for name in REPLICA_NAMES), counted


async def test_handshake_revision_client_through_round_robin(replicas: Replicas) -> None:
    """A 2025-11-25 client (initialize, then requests) against the stateless replicas: no session to stick
    to, so every request may land on either replica, and they do; GET /mcp (the 2025 notification stream)
    answers 405. What stateless mode costs such a client: no elicitation (its user is never asked; under the
    default ``--confirm elicit`` the delete goes ahead) and no resources/subscribe."""
    await both_up(replicas)
    name = "rr-legacy"
    recorder = Recorder()
    asked: list[str] = []

    async def user(context: Any, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="decline")

    try:
        async with lb_client(replicas.url, recorder, mode="legacy", elicitation_callback=user) as client:
            assert client.protocol_version == "2025-11-25"
            tools = ToolClient(client)
            await create_small(tools, name)
            listed = await tools.ok("list_vms", filter_name=name)
            assert [vm["name"] for vm in listed["data"]["vms"]] == [name]
            read = await client.read_resource(f"vm://localhost/{name}")
            assert json.loads(read.contents[0].text)["name"] == name  # type: ignore[union-attr]
            await tools.ok("manage_vm", name=name, action="start")
            await tools.ok("manage_vm", name=name, action="stop", stop_timeout=0)
            assert not client.server_capabilities.resources or not client.server_capabilities.resources.subscribe
            await tools.ok("manage_vm", name=name, action="delete")
            assert asked == [] and not (replicas.vm_dir / name).exists()
    finally:
        kill_vms_under(replicas.vm_dir / name)
    assert recorder.hops[0].rpc == "initialize"
    assert all(h.session_id is None for h in recorder.hops), recorder.hops  # stateless: no Mcp-Session-Id
    assert not [h for h in recorder.hops if h.http_method == "GET"]
    assert set(recorder.served("tools/call")) == set(REPLICA_NAMES), recorder.hops
    async with httpx.AsyncClient() as http:
        for _ in REPLICA_NAMES:  # each replica in turn
            stream = await http.get(
                replicas.url,
                headers={"Accept": "text/event-stream", "MCP-Protocol-Version": "2025-11-25"},
                timeout=10,
            )
            assert stream.status_code == 405, (stream.status_code, stream.text)


async def test_listen_stream_hears_changes_made_on_the_other_replica(replicas: Replicas) -> None:
    """A 2026-07-28 ``subscriptions/listen`` stream opened through HAProxy lands on one replica (its
    ``/healthz`` counts the subscriber); the VM is started and stopped by calling the OTHER replica directly;
    both changes reach the stream, through Redis."""
    await both_up(replicas)
    name = "rr-listen"
    uri = f"vm://localhost/{name}"
    assert replicas.redis.pubsub_clients() >= len(REPLICA_NAMES)  # each replica's bus listens on Redis
    recorder = Recorder()
    heard: list[tuple[float, str]] = []
    async with open_tools(replicas.url) as tools:
        await create_small(tools, name)
        try:
            async with (
                lb_client(replicas.url, recorder) as client,
                client.listen(resource_subscriptions=[uri]) as stream,
            ):

                async def read() -> None:
                    async for event in stream:
                        if isinstance(event, ResourceUpdated):
                            heard.append((time.monotonic(), event.uri))

                async def hear(since: float) -> float:
                    """When the first update of ``uri`` at or after ``since`` arrived."""
                    deadline = time.monotonic() + EVENT_TIMEOUT
                    while time.monotonic() < deadline:
                        late = [at for at, got in heard if got == uri and at >= since]
                        if late:
                            return late[0]
                        await asyncio.sleep(0.01)
                    raise AssertionError(f"no update of {uri} within {EVENT_TIMEOUT} s: {heard}")

                reader = asyncio.create_task(read())
                try:
                    (listen_hop,) = [h for h in recorder.hops if h.rpc == "subscriptions/listen"]
                    holder = listen_hop.served_by
                    assert holder in REPLICA_NAMES
                    other = replicas.other(holder)
                    assert (await replicas.health(holder))["resources"]["subscribers"] == 1
                    assert (await replicas.health(other))["resources"]["subscribers"] == 0
                    published = replicas.redis.published()
                    async with open_tools(replicas.servers[other].url) as direct:
                        latencies = {}
                        for action in ("start", "stop"):
                            mark = time.monotonic()
                            await direct.ok("manage_vm", name=name, action=action, stop_timeout=0)
                            answered = time.monotonic()
                            latencies[action] = await hear(mark) - answered
                    shown = "; ".join(f"{action} {late:+.3f} s" for action, late in latencies.items())
                    print(
                        f"\nchanges made on {other}, heard on {holder}'s listen stream after the call returned: {shown}"
                    )
                    assert replicas.redis.published() >= published + 2
                    # Without `option http-no-delay`, HAProxy held each SSE event back ~0.2 s (MSG_MORE).
                    assert min(latencies.values()) < 0.15, latencies
                    assert (await replicas.health(other))["resources"]["subscribers"] == 0
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
        finally:
            await tools.call("manage_vm", name=name, action="delete", stop_timeout=0)
            kill_vms_under(replicas.vm_dir / name)


async def test_web_console_link_opens_on_any_replica(replicas: Replicas) -> None:
    """A console link signed by replica-1 (called directly) opens on replica-2, and through HAProxy on both;
    its WebSocket, through HAProxy, carries the VM's VNC stream (QEMU's RFB greeting)."""
    await both_up(replicas)
    name = "rr-web"
    first, second = (replicas.servers[n] for n in REPLICA_NAMES)
    async with open_tools(replicas.url) as tools:
        await create_small(tools, name)
        try:
            await tools.ok("manage_vm", name=name, action="start")
            async with open_tools(first.url) as direct:
                link = (await direct.ok("vm_console", name=name, action="web"))["data"]["url"]
            parts = urlsplit(link)
            assert parts.port == first.port
            path = f"{parts.path}?{parts.query}"
            async with httpx.AsyncClient() as http:
                page = await http.get(f"http://127.0.0.1:{second.port}{path}", timeout=10)
                assert page.status_code == 200, page.text
                through = [await http.get(replicas.lb.base + path, timeout=10) for _ in REPLICA_NAMES]
                assert [r.status_code for r in through] == [200, 200], [r.text for r in through]
                assert {r.headers["x-served-by"] for r in through} == set(REPLICA_NAMES)
            ws = f"ws://127.0.0.1:{replicas.lb.port}{parts.path}/ws?{parts.query}"
            for _ in REPLICA_NAMES:
                async with (
                    asyncio.timeout(10),
                    ws_connect(
                        ws,
                        origin=websockets.Origin(replicas.lb.base),
                        subprotocols=[websockets.Subprotocol("binary")],
                    ) as socket,
                ):
                    assert socket.response is not None
                    assert socket.response.headers["X-Served-By"] in REPLICA_NAMES
                    greeting = await socket.recv()
                    assert isinstance(greeting, bytes) and greeting.startswith(b"RFB 003."), greeting
        finally:
            await tools.call("manage_vm", name=name, action="delete", stop_timeout=0)
            kill_vms_under(replicas.vm_dir / name)


async def test_elicitation_rounds_on_different_replicas(replicas: Replicas) -> None:
    """manage_vm delete asks the user (2026-07-28: an input-required result, then a retry carrying the sealed
    ``request_state``). Through round robin the first round and the retry land on different replicas; the
    retry is accepted there thanks to the shared secret, and the VM is deleted."""
    await both_up(replicas)
    name = "rr-elicit"
    recorder = Recorder()
    asked: list[tuple[str, str | None]] = []

    async def user(context: Any, params: ElicitRequestParams) -> ElicitResult:
        asked.append((params.message, recorder.hops[-1].served_by))
        return ElicitResult(action="accept", content={"confirm": True})

    before = await all_tool_calls(replicas)
    try:
        async with lb_client(replicas.url, recorder, elicitation_callback=user) as client:
            assert client.protocol_version == "2026-07-28"
            tools = ToolClient(client)
            await create_small(tools, name)
            assert asked == []
            deleted = await tools.ok("manage_vm", name=name, action="delete")
            assert deleted["success"], deleted
    finally:
        kill_vms_under(replicas.vm_dir / name)
    assert not (replicas.vm_dir / name).exists()
    first, retry = recorder.served("tools/call", "manage_vm")[-2:]
    assert first != retry and {first, retry} == set(REPLICA_NAMES), recorder.hops
    assert len(asked) == 1 and f"Delete VM {name}" in asked[0][0] and asked[0][1] == first, asked
    after = await all_tool_calls(replicas)
    assert first is not None and retry is not None
    assert delta(after[first], before[first])[("manage_vm", "input_required")] == 1
    assert delta(after[retry], before[retry])[("manage_vm", "success")] >= 1


async def test_replica_killed_during_a_start_loses_nothing(replicas: Replicas, guest_isos: GuestISOs) -> None:
    """SIGKILL of the replica serving ``manage_vm start wait=agent`` while the guest boots: the call fails,
    nothing else does. Through HAProxy afterwards, every VM is listed with a readable definition (the booting
    one still runs: QEMU outlives the server), the guest finishes booting, and all VMs stop and delete. The
    time HAProxy's health checks take to mark the dead replica down is printed; the replica is restarted."""
    await both_up(replicas)
    names = ["kill-boot", "kill-run", "kill-idle"]
    recorder = Recorder()
    progressed = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        progressed.set()

    victim = None
    try:
        async with lb_client(replicas.url, recorder) as client:
            tools = ToolClient(client)
            await create_guest(tools, names[0], guest_isos)
            for name in names[1:]:
                await create_small(tools, name)
            await tools.ok("manage_vm", name=names[1], action="start")
            starting = asyncio.create_task(
                client.call_tool(
                    "manage_vm",
                    {"name": names[0], "action": "start", "wait": "agent", "wait_timeout": 300},
                    progress_callback=on_progress,
                )
            )
            await asyncio.wait_for(progressed.wait(), 60)  # QEMU runs; the call waits for the agent
            victim = recorder.served("tools/call", "manage_vm")[-1]
            assert victim in REPLICA_NAMES
            survivor = replicas.other(victim)
            killed_at = time.monotonic()
            replicas.servers[victim].stop(signal.SIGKILL)
            outcome = (await asyncio.gather(asyncio.wait_for(starting, 30), return_exceptions=True))[0]
            assert isinstance(outcome, BaseException) or outcome.is_error, outcome
            print(f"\nthe start call through the dead {victim} ended with: {outcome!r:.200}")
            marked = await asyncio.to_thread(replicas.lb.wait_for, {victim: "DOWN", survivor: "UP"}, 20)
            print(f"haproxy marked {victim} down {time.monotonic() - killed_at:.2f} s after SIGKILL "
                  f"(waited {marked:.2f} s after the call ended)")  # fmt: skip

            listed = await tools.ok("list_vms")
            vms = {vm["name"]: vm for vm in listed["data"]["vms"] if vm["name"] in names}
            assert sorted(vms) == sorted(names), listed
            assert not listed["data"].get("incomplete"), listed
            assert vms[names[0]]["status"] == vms[names[1]]["status"] == "running"
            assert vms[names[2]]["status"] == "stopped"
            for name in names:
                definition = json.loads((replicas.vm_dir / name / "vm.json").read_text())
                assert definition["name"] == name
                read = await client.read_resource(f"vm://localhost/{name}")
                assert json.loads(read.contents[0].text)["name"] == name  # type: ignore[union-attr]
            await tools.ok("vm_console", name=names[0], action="wait", pattern=READY_MARKER, offset=0,
                           timeout=BOOT_TIMEOUT)  # fmt: skip
            for name in names[:2]:
                await tools.ok("manage_vm", name=name, action="stop", stop_timeout=0)
            for name in names:
                await tools.ok("manage_vm", name=name, action="delete")
                assert not (replicas.vm_dir / name).exists()
            assert set(recorder.served("tools/call")[-5:]) == {survivor}
    finally:
        for name in names:
            kill_vms_under(replicas.vm_dir / name)
        restarted = time.monotonic()
        await both_up(replicas)
        if victim is not None:
            print(f"{victim} restarted and marked up by haproxy in {time.monotonic() - restarted:.2f} s")


async def test_replica_killed_holding_a_vm_lock(replicas: Replicas) -> None:
    """A create (through HAProxy) whose ``qemu-img create`` hangs holds the VM's ``flock`` in the replica
    serving it; the other replica, asked directly to delete the same VM, waits for the lock. SIGKILL of the
    holder frees the lock: the waiting delete goes on at once and removes the half-made VM. Right after the
    kill, calls through HAProxy succeed (a refused connection is retried on the survivor).

    The create's own client fails: HAProxy closes a keep-alive client connection without any response when
    the replica dies before answering a request that is not the connection's first (it expects the client
    to retry; no 502, no log line), and the Python SDK's client then fails as a whole, not only that call.
    """
    await both_up(replicas)
    name = SLOW_CREATE_VM
    lock = replicas.vm_dir / ".locks" / f"{name}.lock"
    holder = None

    async def create_through_the_proxy() -> dict[str, Any]:
        async with lb_client(replicas.url, Recorder()) as client:
            return await ToolClient(client).call(
                "manage_vm", name=name, action="create", arch="x86_64", memory="64M", disk="size=16M"
            )

    try:
        creating = asyncio.create_task(create_through_the_proxy())
        deadline = time.monotonic() + 15
        while holder is None and time.monotonic() < deadline:
            pid = lock_holder(lock)
            holder = replicas.by_pid(pid) if pid is not None else None
            await asyncio.sleep(0.05)
        assert holder is not None, f"no replica holds {lock}"
        assert pids_running(f"{replicas.shim_dir}/qemu-img create")
        other = replicas.other(holder)
        async with lb_client(replicas.url, Recorder()) as client, open_tools(replicas.servers[other].url) as direct:
            tools = ToolClient(client)
            await tools.ok("list_vms")  # this client's connection to HAProxy is open before the kill
            waiting = asyncio.create_task(direct.call("manage_vm", name=name, action="delete", stop_timeout=0))
            answered: list[float] = []
            waiting.add_done_callback(lambda _: answered.append(time.monotonic()))
            await asyncio.sleep(2)
            assert not waiting.done(), waiting  # the other replica waits for the VM's lock
            killed_at = time.monotonic()
            replicas.servers[holder].stop(signal.SIGKILL)
            # At once, before any health check could tell: HAProxy retries refused connections elsewhere.
            redispatched = int(replicas.lb.stats()["BACKEND"]["wredis"] or 0)
            for _ in range(4):
                await tools.ok("list_vms")
            assert int(replicas.lb.stats()["BACKEND"]["wredis"] or 0) > redispatched
            deleted = await asyncio.wait_for(waiting, 30)
            freed = answered[0] - killed_at
            assert deleted["success"], deleted
            print(f"\nthe delete waiting on {other} was answered {freed:.2f} s after {holder} was killed")
            assert freed < 10
            outcome = (await asyncio.gather(asyncio.wait_for(creating, 30), return_exceptions=True))[0]
            assert isinstance(outcome, BaseException), outcome
            print(f"the create's client through the dead {holder} failed with: {leaves(outcome)}")
            assert lock_holder(lock) is None
            listed = await tools.ok("list_vms")
            assert name not in [vm["name"] for vm in listed["data"]["vms"]]
            assert name not in listed["data"].get("incomplete", []), listed
            assert not (replicas.vm_dir / name).exists()
    finally:
        kill_groups(pids_running(f"{replicas.shim_dir}/qemu-img"))  # the dead replica's orphaned, sleeping shim
        kill_vms_under(replicas.vm_dir / name)
        await both_up(replicas)


async def test_sticky_sessions_for_stateful_replicas(workdir: Path) -> None:
    """The alternative to stateless mode: deploy/haproxy.cfg with its three ``stick`` lines uncommented, in
    front of replicas WITHOUT ``QEMU_MCP_STATELESS``. A 2025-11-25 client's session sticks to the replica that
    answered its initialize (every POST, its GET notification stream, its DELETE), so it keeps what stateless
    mode takes away: elicitation (delete asks; accepted) and resources/subscribe notifications, here of changes
    made by calling the OTHER replica directly (they cross through Redis)."""
    name = "sticky"
    uri = f"vm://localhost/{name}"
    recorder = Recorder()
    asked: list[str] = []
    updates: list[float] = []

    async def user(context: Any, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"confirm": True})

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification) and str(message.params.uri) == uri:
            updates.append(time.monotonic())

    async def updated_since(mark: float) -> bool:
        return any(at >= mark for at in updates)

    with cluster(workdir, "sticky", stateless=False, config=sticky_config(workdir / "sticky-config")) as sticky:
        try:
            async with lb_client(
                sticky.url, recorder, mode="legacy", elicitation_callback=user, message_handler=on_message
            ) as client:
                assert client.protocol_version == "2025-11-25"
                tools = ToolClient(client)
                await create_small(tools, name)
                await client.subscribe_resource(uri)
                home = recorder.hops[0].served_by
                assert home in REPLICA_NAMES and recorder.hops[0].session_id
                other = sticky.other(home)
                assert (await sticky.health(home))["resources"]["subscribers"] == 1
                async with open_tools(sticky.servers[other].url) as direct:
                    for action in ("start", "stop"):
                        mark = time.monotonic()
                        await direct.ok("manage_vm", name=name, action=action, stop_timeout=0)
                        assert await wait_for(lambda at=mark: updated_since(at), EVENT_TIMEOUT), (action, updates)
                for _ in range(3):
                    await tools.ok("list_vms", filter_name=name)
                await tools.ok("manage_vm", name=name, action="delete")
                assert len(asked) == 1 and f"Delete VM {name}" in asked[0], asked
                assert not (sticky.vm_dir / name).exists()
        finally:
            kill_vms_under(sticky.vm_dir / name)
    assert {h.served_by for h in recorder.hops} == {home}, recorder.hops
    methods = Counter(h.http_method for h in recorder.hops)
    assert methods["GET"] == 1 and methods["DELETE"] == 1 and methods["POST"] >= 8, methods


def leaves(error: BaseException) -> list[str]:
    """The innermost errors of an exception group, as ``Type: message``."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [f"{type(error).__name__}: {error}"]


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, replicas: Replicas) -> Iterator[None]:
    """On a failure, the tail of each replica's and HAProxy's log, in the captured output of the test."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        print(replicas.logs())
