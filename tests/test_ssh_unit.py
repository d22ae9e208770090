"""The SSH host and its pool in-process, against the real test sshd (no mocks, no HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qemu_mcp_http.errors import (
    CommandNotFound,
    CredentialUnusable,
    HostAuthFailed,
    HostKeyRejected,
    HostUnreachable,
    OperationTimeout,
    SocketUnavailable,
)
from qemu_mcp_http.hosts import PoolLimits, SSHHost, SSHPool, SSHTarget

from .sshd import SSHServer

T = 10.0  # operation timeout of these tests


def limits(server: SSHServer, **changes: object) -> PoolLimits:
    base: dict[str, object] = {"known_hosts": str(server.known_hosts), "connect_timeout": 3.0}
    return PoolLimits(**{**base, **changes})  # type: ignore[arg-type]


def key_target(server: SSHServer, host: str | None = None) -> SSHTarget:
    return SSHTarget(host or server.address, server.port, server.user, key_path=str(server.key))


def pwd_target(server: SSHServer, password: str | None = None) -> SSHTarget:
    return SSHTarget(server.address, server.port, server.user, password=password or server.password)


@contextlib.asynccontextmanager
async def pool_of(lim: PoolLimits) -> AsyncIterator[SSHPool]:
    pool = SSHPool(lim)
    try:
        yield pool
    finally:
        await pool.aclose()


async def test_commands_are_never_shell_strings(sshd: SSHServer) -> None:
    """Every argv element reaches the remote program verbatim: no expansion, no injection."""
    async with pool_of(limits(sshd)) as pool:
        host = SSHHost(pool, key_target(sshd))
        nasty = ["a b", "$(id)", "`id`", "'; touch /tmp/pwned-qmh; '", "*", "~", "$HOME", "\\n", ""]
        result = await host.run(["printf", "%s|", *nasty], timeout=T)
        assert result.stdout == "|".join(nasty) + "|"
        assert not os.path.exists("/tmp/pwned-qmh")
        whoami = await host.run(["id", "-un"], timeout=T)
        assert whoami.stdout.strip() == sshd.user
        failed = await host.run(["sh", "-c", "echo oops >&2; exit 3"], timeout=T, check=False)
        assert (failed.returncode, failed.stderr.strip()) == (3, "oops")
        echoed = await host.run(["cat"], timeout=T, stdin=b"from stdin")
        assert echoed.stdout == "from stdin"
        # Hosts raise transport errors only: the VM layer says "install QEMU" (vm/commands.py).
        with pytest.raises(CommandNotFound, match="qemu-system-nope: command not found on"):
            await host.run(["qemu-system-nope", "-version"], timeout=T)


async def test_files_batched_atomic_and_round_trips_constant(sshd: SSHServer) -> None:
    """read_files costs the same round trips for 3 or 60 files; write_file is atomic; stat and list_dir work."""
    async with pool_of(limits(sshd)) as pool:
        host = SSHHost(pool, pwd_target(sshd))
        base = str(sshd.vm_dir)
        await host.run(["mkdir", "-p", "--", f"{base}/files"], timeout=T)
        for i in range(60):
            await host.write_file(f"{base}/files/f{i}.json", f'{{"n": {i}}}\n'.encode(), timeout=T)
        assert sorted(os.listdir(f"{base}/files")) == sorted(f"f{i}.json" for i in range(60))  # no temp files left
        paths = [f"{base}/files/f{i}.json" for i in range(60)]

        async def trips(batch: list[str]) -> int:
            before = pool.stats.round_trips
            got = await host.read_files([*batch, f"{base}/missing", "/proc/self/status", "/etc/shadow"], timeout=T)
            assert got[f"{base}/missing"] is None and got["/etc/shadow"] is None  # missing / unreadable
            assert b"Name:" in (got["/proc/self/status"] or b"")  # /proc files report size 0 but are read whole
            for p in batch:
                assert got[p] == f'{{"n": {int(p.rsplit("f", 1)[1].split(".")[0])}}}\n'.encode()
            return pool.stats.round_trips - before

        assert await trips(paths[:3]) == await trips(paths)
        st = await host.stat(paths[0], timeout=T)
        assert st is not None and st.is_file and not st.is_dir and st.size == len(b'{"n": 0}\n')
        assert await host.stat(f"{base}/nope", timeout=T) is None
        assert (await host.list_dir(f"{base}/files", timeout=T))[:2] == ["f0.json", "f1.json"]
        assert await host.list_dir(f"{base}/nope", timeout=T) == []
        await host.write_file(paths[0], b"replaced\n", timeout=T)
        assert Path(paths[0]).read_bytes() == b"replaced\n"
        assert Path(paths[0]).stat().st_uid != 0  # written as the SSH user
        await host.run(["rm", "-rf", "--", f"{base}/files"], timeout=T)


async def test_unix_socket_through_the_connection(sshd: SSHServer) -> None:
    """A remote unix socket is reached over a direct-streamlocal channel bridged to a local socket."""
    path = str(sshd.root / "echo.sock")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(echo, path)
    os.chmod(path, 0o777)
    try:
        async with pool_of(limits(sshd)) as pool:
            host = SSHHost(pool, key_target(sshd))
            sock = await host.open_unix_socket(path, timeout=T)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            writer.write(b"hello qmp\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readline(), T) == b"HELLO QMP\n"
            writer.close()
            with pytest.raises(SocketUnavailable, match="nothing listens at"):
                await host.open_unix_socket(str(sshd.root / "absent.sock"), timeout=T)
            assert pool.stats.connections_opened == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_pool_shares_one_connection_and_respects_limits(sshd: SSHServer) -> None:
    """Concurrent calls share a connection; more connections only when channels run out, never over the limit."""
    async with pool_of(limits(sshd, max_connections_per_host=2, max_channels_per_connection=3)) as pool:
        target = key_target(sshd)
        host = SSHHost(pool, target)
        await asyncio.gather(*(host.list_dir(str(sshd.vm_dir), timeout=T) for _ in range(20)))
        assert pool.stats.connections_opened == 1  # SFTP requests multiplex on one session
        results = await asyncio.gather(*(host.run(["sleep", "0.3"], timeout=T) for _ in range(8)))
        assert all(r.succeeded for r in results)
        assert pool.stats.connections_opened == 2  # 2 exec slots per connection (3 channels - SFTP), 2 at most
        assert pool.snapshot()["hosts"] == {target.label: 2}
        # Another credential for the same account is another connection (a wrong one must not ride on it).
        other = SSHHost(pool, pwd_target(sshd))
        await other.run(["true"], timeout=T)
        assert pool.stats.connections_opened == 3


async def test_dead_connection_is_replaced_and_the_call_retried(sshd: SSHServer) -> None:
    """Killing the sshd child of a pooled connection: the very next call still succeeds, on a new connection."""
    async with pool_of(limits(sshd)) as pool:
        host = SSHHost(pool, key_target(sshd))
        await host.run(["true"], timeout=T)
        children = sshd.connection_pids()
        assert children
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        # No await in between: the pool has not yet seen the connection die, so the call meets a dead one.
        got = await host.read_files(["/proc/uptime"], timeout=T)
        assert got["/proc/uptime"]
        assert pool.stats.connections_opened == 2 and pool.stats.retries == 1
        assert (await host.run(["echo", "ok"], timeout=T)).stdout == "ok\n"


async def test_idle_connections_are_closed(sshd: SSHServer) -> None:
    async with pool_of(limits(sshd, idle_timeout=0.3)) as pool:
        target = key_target(sshd)
        async with pool.use(target):
            await SSHHost(pool, target).run(["true"], timeout=T)
            await asyncio.sleep(0.5)
            assert await pool.close_idle() == 0  # held by a call: never idle
        await asyncio.sleep(1.2)  # the pool's own reaper closes it
        assert pool.snapshot()["open_connections"] == 0 and pool.stats.connections_closed == 1
        await SSHHost(pool, target).run(["true"], timeout=T)
        assert pool.stats.connections_opened == 2


async def test_connect_errors_are_clear_and_quick(sshd: SSHServer) -> None:
    """Wrong password, missing key, refused port: each its own error, within the connect timeout, no secret."""
    async with pool_of(limits(sshd, connect_timeout=2.0)) as pool:
        began = time.monotonic()
        with pytest.raises(HostAuthFailed, match="failed with the given password") as info:
            async with pool.use(pwd_target(sshd, "Wrong-Secret-123")):
                pass
        assert "Wrong-Secret-123" not in str(info.value) and "Wrong-Secret-123" not in repr(info.value)
        assert "Wrong-Secret-123" not in repr(pwd_target(sshd, "Wrong-Secret-123"))
        with pytest.raises(CredentialUnusable, match="does not exist on the server"):
            async with pool.use(SSHTarget(sshd.address, sshd.port, sshd.user, key_path=str(sshd.key_dir / "none"))):
                pass
        with pytest.raises(HostUnreachable, match="refused"):
            async with pool.use(SSHTarget(sshd.address, sshd.unused_port(), sshd.user, password="x")):
                pass
        assert time.monotonic() - began < 2.0 * 3
        # Concurrent calls to a failing target share one connect attempt (and its error) instead of queueing.
        failures = pool.stats.connect_failures

        async def attempt() -> None:
            async with pool.use(pwd_target(sshd, "Wrong-Secret-123")):
                pass

        results = await asyncio.gather(*(attempt() for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, HostAuthFailed) for r in results)
        assert pool.stats.connect_failures == failures + 1
        # A key the server does not authorize.
        stranger = sshd.key_dir / "stranger"
        if not stranger.exists():
            await (await asyncio.create_subprocess_exec("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                                          str(stranger))).wait()  # fmt: skip
        with pytest.raises(HostAuthFailed, match=f"key {stranger}"):
            async with pool.use(SSHTarget(sshd.address, sshd.port, sshd.user, key_path=str(stranger))):
                pass


async def test_host_key_policies(sshd: SSHServer, tmp_path: Path) -> None:
    """strict refuses unknown and changed keys (saying how to trust); accept-new records; off trusts all."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    async with pool_of(limits(sshd, known_hosts=str(empty))) as pool:
        with pytest.raises(
            HostKeyRejected, match=rf"unknown .*ssh-keyscan -p \d+ {re.escape(sshd.address)} >> "
        ) as info:
            async with pool.use(key_target(sshd)):
                pass
        assert "accept-new" in info.value.message
    changed = tmp_path / "changed"
    other = (tmp_path / "otherkey").as_posix()
    await (await asyncio.create_subprocess_exec("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other)).wait()
    changed.write_text(f"[{sshd.address}]:{sshd.port} " + " ".join(Path(other + ".pub").read_text().split()[:2]))
    for policy in ("strict", "accept-new"):
        async with pool_of(limits(sshd, known_hosts=str(changed), host_key_policy=policy)) as pool:
            with pytest.raises(HostKeyRejected, match="CHANGED"):
                async with pool.use(key_target(sshd)):
                    pass
    fresh = tmp_path / "sub" / "known_hosts"
    async with (
        pool_of(limits(sshd, known_hosts=str(fresh), host_key_policy="accept-new")) as pool,
        pool.use(key_target(sshd)),
    ):
        pass
    assert fresh.read_text() == sshd.host_key_line()
    async with pool_of(limits(sshd, known_hosts=str(fresh))) as pool:  # strict now trusts the recorded key
        await SSHHost(pool, key_target(sshd)).run(["true"], timeout=T)
    async with pool_of(limits(sshd, known_hosts=str(empty), host_key_policy="off")) as pool:
        await SSHHost(pool, key_target(sshd)).run(["true"], timeout=T)


async def test_remote_lock_holds_across_pools_and_dies_with_its_connection(sshd: SSHServer) -> None:
    """The per-VM lock of an SSH host is a flock held by a process there: a second pool (another server)
    waits for it, gives up at its timeout with the lock-timeout message, and gets it as soon as the holder's
    connection closes (a server that dies); a discarded lock removes its file while still holding it."""
    path = f"{sshd.vm_dir}/.locks/web.lock"
    async with pool_of(limits(sshd)) as first, pool_of(limits(sshd)) as second:
        a, b = SSHHost(first, key_target(sshd)), SSHHost(second, key_target(sshd))
        async with a.lock_file(path, timeout=T) as held:
            assert held.held and os.path.exists(path)
            with pytest.raises(OperationTimeout, match=f"another process held the lock {path}"):
                async with b.lock_file(path, timeout=1):
                    pass
            began = time.monotonic()

            async def release_soon() -> None:
                await asyncio.sleep(1.0)
                await first.aclose()  # the holder's connections close, as when its server dies

            closer = asyncio.create_task(release_soon())
            async with b.lock_file(path, timeout=T) as taken:
                waited = time.monotonic() - began
                assert taken.held and 0.9 < waited < 5, waited
                taken.discard()
            await closer
        assert not os.path.exists(path)  # removed by the discarding holder
    async with pool_of(limits(sshd)) as pool:
        host = SSHHost(pool, key_target(sshd))
        async with host.lock_file(f"{sshd.root}/no-such-vm-dir/.locks/x.lock", timeout=T) as notional:
            assert not notional.held  # no vm_dir: nothing to guard, nothing created
        assert not os.path.exists(f"{sshd.root}/no-such-vm-dir")
