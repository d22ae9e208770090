"""The web console (``qemu_mcp_http.web.console``): signed links, the page, noVNC's files and the WebSocket
that carries a VM's VNC stream, served by uvicorn on a loopback port of the test.

The end-to-end test starts a real QEMU (q35, ``-device VGA``, VNC on a unix socket, SeaBIOS's text screen)
and drives a real headless Chromium over the DevTools protocol (``--remote-debugging-pipe``: NUL-separated
JSON on file descriptors 3 and 4, no port) to the console page; once noVNC shows the guest, the VM is paused
(its screen, cursor blink included, then stands still), and the page's screenshot of the canvas is compared
with QMP ``screendump`` of the same screen, pixel by pixel (both PNGs decoded by tests/pngutil.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2 as httpx
import pytest
import uvicorn
import websockets
from qemu.qmp import QMPClient
from starlette.applications import Starlette
from starlette.middleware import Middleware
from websockets.asyncio.client import connect as ws_connect

from qemu_mcp_http.access.headers import HeaderGuard
from qemu_mcp_http.console.links import ConsoleGrant, ConsoleLinks, console_path
from qemu_mcp_http.errors import InvalidInput, SocketUnavailable
from qemu_mcp_http.hosts.local import LocalHost
from qemu_mcp_http.web.console import OpenVnc, console_routes

from .pngutil import png_rgb, rgba_to_rgb, same_pixels

NOVNC_DIR = "/usr/share/novnc"
QEMU = "qemu-system-x86_64"
CHROMIUM = shutil.which("chromium")
HOSTS = ("127.0.0.1:*", "localhost:*", "127.0.0.1", "localhost")
ORIGINS = ("http://127.0.0.1:*", "http://localhost:*")
SECRET = b"0123456789abcdef-web-console-test"
#: Every wait of these tests ends; the browser test as a whole takes ~5 s under TCG.
STEP_TIMEOUT = 30.0
#: Identical pixels the canvas must share with the screendump (both are exact: VNC is lossless by default).
SAME_PIXELS = 0.999


def test_png_decoder_reads_a_qemu_screendump() -> None:
    """The decoder against a known screendump (SeaBIOS, VGA text mode): its size, and text on black."""
    width, height, rgb = png_rgb((Path(__file__).parent / "data" / "screendump-vga.png").read_bytes())
    assert (width, height) == (720, 400)
    assert len(rgb) == 720 * 400 * 3
    lit = sum(1 for i in range(0, len(rgb), 3) if rgb[i : i + 3] != b"\0\0\0")
    assert 0 < lit < 720 * 400 // 4


# -- signed links ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_link_round_trip_and_expiry() -> None:
    clock = Clock()
    links = ConsoleLinks(SECRET, ttl=120, clock=clock)
    token = links.sign("localhost", "web-1", "/var/lib/qemu", "alice")
    assert token.isascii() and quote(token, safe="") == token  # URL-safe as it is
    grant = links.verify(token, "localhost", "web-1")
    assert grant == ConsoleGrant("localhost", "web-1", "/var/lib/qemu", "alice", clock.now + 120)
    clock.now += 119.9
    assert links.verify(token, "localhost", "web-1") is not None
    clock.now += 0.1
    assert links.verify(token, "localhost", "web-1") is None  # expired


def test_link_refused_for_another_vm_host_secret_or_tampering() -> None:
    links = ConsoleLinks(SECRET)
    token = links.sign("lab", "web-1", "/srv/vms", "alice")
    assert links.verify(token, "lab", "web-1") is not None
    assert links.verify(token, "lab", "web-2") is None
    assert links.verify(token, "localhost", "web-1") is None
    assert ConsoleLinks(b"another secret of 16+ bytes").verify(token, "lab", "web-1") is None
    body, _, mac = token.partition(".")
    forged = base64.urlsafe_b64encode(
        json.dumps([1, "lab", "web-2", "/srv/vms", "alice", time.time() + 60]).encode()
    ).rstrip(b"=")
    for bad in (
        f"{forged.decode()}.{mac}",  # another VM under the old signature
        f"{body}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}",  # signature changed
        f"{body[:-1]}{'A' if body[-1] != 'A' else 'B'}.{mac}",  # payload changed
        body,
        "",
        ".",
        "x" * 10_000,
        f"{body}.{mac}é",
    ):
        assert links.verify(bad, "lab", "web-1") is None, bad


def test_link_rules() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ConsoleLinks(b"short")
    for ttl in (0.0, -1.0, float("nan"), float("inf"), 86401.0):
        with pytest.raises(ValueError, match="lifetime"):
            ConsoleLinks(SECRET, ttl=ttl)
    links = ConsoleLinks(SECRET)
    for host, vm in (("static", "vm"), ("", "vm"), ("a/b", "vm"), ("localhost", ".."), ("localhost", "x/y")):
        with pytest.raises(InvalidInput):
            links.sign(host, vm, "/var/lib/qemu", "alice")
    assert console_path("lab 1", "web-1", "ab.c") == "/console/lab%201/web-1?token=ab.c"


# -- a server of the routes, on a loopback port ----------------------------------------------------


def console_app(
    links: ConsoleLinks,
    open_vnc: OpenVnc,
    novnc: str,
    **options: float,
) -> Any:
    routes = console_routes(links, open_vnc, novnc, allowed_origins=ORIGINS, allowed_hosts=HOSTS, **options)
    guard = Middleware(HeaderGuard, allowed_hosts=HOSTS, allowed_origins=ORIGINS)
    return Starlette(routes=routes, middleware=[guard])


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """``app`` served by uvicorn on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # As the server's command line does: no logging config of uvicorn's own, its request lines at INFO.
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="info", log_config=None))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not server.started:
                assert not task.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await task
        finally:
            sock.close()


def server_lines(caplog: pytest.LogCaptureFixture) -> str:
    """What the server side logged (uvicorn and the console), without the test's HTTP client."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("uvicorn", "qemu_mcp_http")))


async def never_opened(grant: ConsoleGrant) -> socket.socket:
    raise AssertionError(f"the VNC socket must not be opened for {grant}")


@pytest.fixture
def fake_novnc(tmp_path: Path) -> Path:
    """A noVNC directory with a module, a file of an unserved type, and a link leading out of it."""
    root = tmp_path / "novnc"
    (root / "core").mkdir(parents=True)
    (root / "core" / "rfb.js").write_text("export default class RFB {}\n")
    (root / "vnc.html").write_text("<html></html>")
    (tmp_path / "secret.js").write_text("the server's secret\n")
    (root / "core" / "out.js").symlink_to(tmp_path / "secret.js")
    return root


async def raw_get(base: str, target: str) -> tuple[int, bytes]:
    """``GET target`` sent as it is (an HTTP client would normalize ``..``): the status and the body."""
    host, port = base.removeprefix("http://").split(":")
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            answer = await reader.read()
        finally:
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_page_refuses_bad_links_and_serves_a_strict_page(
    fake_novnc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    links = ConsoleLinks(SECRET, ttl=60, clock=clock)
    async with serve(console_app(links, never_opened, str(fake_novnc))) as base, httpx.AsyncClient() as http:
        token = links.sign("localhost", "web-1", "/var/lib/qemu", "alice")
        ok = await http.get(base + console_path("localhost", "web-1", token), timeout=STEP_TIMEOUT)
        assert ok.status_code == 200, ok.text
        csp = ok.headers["content-security-policy"]
        nonce = csp.split("'nonce-")[1].split("'")[0]
        assert f'<script type="module" nonce="{nonce}">' in ok.text
        assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert ok.headers["referrer-policy"] == "no-referrer"
        assert ok.headers["cache-control"] == "no-store"
        again = await http.get(base + console_path("localhost", "web-1", token), timeout=STEP_TIMEOUT)
        assert again.headers["content-security-policy"] != csp  # a fresh nonce each time
        odd = '<b>"x\\'
        odd_token = links.sign("localhost", odd, "/var/lib/qemu", "alice")
        escaped = await http.get(base + console_path("localhost", odd, odd_token), timeout=STEP_TIMEOUT)
        assert escaped.status_code == 200 and odd not in escaped.text
        assert 'data-label="&lt;b&gt;&quot;x\\ on localhost"' in escaped.text

        other_vm = links.sign("localhost", "web-2", "/var/lib/qemu", "alice")
        for name, path in {
            "other VM": console_path("localhost", "web-1", other_vm),
            "tampered": console_path("localhost", "web-1", token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")),
            "no token": "/console/localhost/web-1",
            "other host": console_path("lab", "web-1", token),
        }.items():
            refused = await http.get(base + path, timeout=STEP_TIMEOUT)
            assert refused.status_code == 403, name
            assert "invalid or has expired" in refused.text and "vm_console" in refused.text, name
            assert refused.headers["cache-control"] == "no-store"
        clock.now += 61
        expired = await http.get(base + console_path("localhost", "web-1", token), timeout=STEP_TIMEOUT)
        assert expired.status_code == 403 and "expired" in expired.text
        # The middleware's Host check holds for the page too.
        rebound = await http.get(
            base + console_path("localhost", "web-1", token), headers={"Host": "evil.example"}, timeout=STEP_TIMEOUT
        )
        assert rebound.status_code == 421
    # uvicorn logged each request line, with the token's value redacted.
    server_log = server_lines(caplog)
    assert "GET /console/localhost/web-1?token=[redacted] HTTP/1.1" in server_log
    assert token.partition(".")[0] not in server_log


async def test_static_serves_novnc_files_only(fake_novnc: Path) -> None:
    async with serve(console_app(ConsoleLinks(SECRET), never_opened, str(fake_novnc))) as base:
        async with httpx.AsyncClient() as http:
            module = await http.get(base + "/console/static/core/rfb.js", timeout=STEP_TIMEOUT)
        assert module.status_code == 200 and module.text.startswith("export default")
        assert module.headers["content-type"].startswith("text/javascript")
        assert module.headers["x-content-type-options"] == "nosniff"
        for target in (
            "/console/static/../secret.js",
            "/console/static/core/../../secret.js",
            "/console/static/%2e%2e/secret.js",
            "/console/static/core/%2e%2e/%2e%2e/secret.js",
            "/console/static/..%2fsecret.js",
            "/console/static//etc/passwd",
            "/console/static/%2fetc%2fpasswd",
            "/console/static/core/out.js",  # a link that leads out of the directory
            "/console/static/core",  # a directory
            "/console/static/core/",
            "/console/static/vnc.html",  # not a served type
            "/console/static/core/missing.js",
            "/console/static/core/rfb.js%00.png",
        ):
            status, body = await raw_get(base, target)
            assert status in (400, 404), (target, status)
            assert b"secret" not in body and b"root:" not in body, target


async def test_missing_novnc_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    links = ConsoleLinks(SECRET)
    missing = tmp_path / "no-novnc"
    async with serve(console_app(links, never_opened, str(missing))) as base, httpx.AsyncClient() as http:
        token = links.sign("localhost", "web-1", "/var/lib/qemu", "alice")
        page = await http.get(base + console_path("localhost", "web-1", token), timeout=STEP_TIMEOUT)
        assert page.status_code == 503
        assert "noVNC is not installed" in page.text and "novnc" in page.text
        static = await http.get(base + "/console/static/core/rfb.js", timeout=STEP_TIMEOUT)
        assert static.status_code == 404


# -- the WebSocket --------------------------------------------------------------------------------


EOF = b"<eof>"


def ws_url(base: str, host: str, vm: str, token: str) -> str:
    return "ws" + base.removeprefix("http") + f"/console/{host}/{vm}/ws?token={token}"


@contextlib.asynccontextmanager
async def echo_vnc(directory: Path) -> AsyncIterator[tuple[Path, list[bytes]]]:
    """A unix socket that answers each chunk it gets with that chunk, and closes on ``bye``; records what it got,
    and :data:`EOF` when its client closed."""
    path = directory / "vnc.sock"
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                received.append(data)
                if data == b"bye":
                    break
                writer.write(data)
                await writer.drain()
            else:
                received.append(EOF)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield path, received
    finally:
        server.close()
        async with asyncio.timeout(STEP_TIMEOUT):
            await server.wait_closed()


async def test_websocket_pumps_both_ways_and_refuses_bad_links(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    links = ConsoleLinks(SECRET, ttl=60, clock=clock)
    opened: list[ConsoleGrant] = []
    async with echo_vnc(tmp_path) as (sock_path, received):

        async def open_vnc(grant: ConsoleGrant) -> socket.socket:
            opened.append(grant)
            return await LocalHost().open_unix_socket(str(sock_path), timeout=5)

        async with serve(console_app(links, open_vnc, str(tmp_path))) as base:
            origin = base
            port = int(base.rpartition(":")[2])
            token = links.sign("localhost", "web-1", str(tmp_path), "alice")
            async with asyncio.timeout(STEP_TIMEOUT):
                async with ws_connect(
                    ws_url(base, "localhost", "web-1", token),
                    origin=websockets.Origin(origin),
                    subprotocols=[websockets.Subprotocol("binary")],
                ) as ws:
                    assert ws.subprotocol == "binary"
                    await ws.send(b"RFB 003.008\n")
                    assert await ws.recv() == b"RFB 003.008\n"
                    await ws.send(b"bye")  # the VNC side closes: so does the WebSocket, cleanly
                    with pytest.raises(websockets.ConnectionClosedOK) as closed:
                        await ws.recv()
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
                    assert "display closed" in closed.value.rcvd.reason
            assert received == [b"RFB 003.008\n", b"bye"]
            assert [g.client for g in opened] == ["alice"]

            # A bad link: the WebSocket opens, then closes with 1008 (policy) and says why.
            other_vm = links.sign("localhost", "web-2", str(tmp_path), "alice")
            tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
            for name, url in {
                "other VM": ws_url(base, "localhost", "web-1", other_vm),
                "tampered": ws_url(base, "localhost", "web-1", tampered),
                "no token": ws_url(base, "localhost", "web-1", ""),
            }.items():
                await expect_policy_close(url, origin, name)
            clock.now += 61
            await expect_policy_close(ws_url(base, "localhost", "web-1", token), origin, "expired")
            clock.now -= 61

            # A foreign Origin or Host: refused before the handshake, like HeaderGuard refuses HTTP requests.
            for name, kwargs, status in (
                ("foreign origin", {"origin": websockets.Origin("http://evil.example")}, 403),
                ("lookalike origin", {"origin": websockets.Origin("http://127.0.0.1.evil.example:80")}, 403),
                # A name that resolves to this server (DNS rebinding): the URL's name is the Host header.
                ("foreign host", {"origin": websockets.Origin(origin), "host": "127.0.0.1", "port": port}, 403),
            ):
                url = ws_url(base, "localhost", "web-1", token)
                if name == "foreign host":
                    url = url.replace("127.0.0.1", "rebound.example")
                with pytest.raises(websockets.InvalidStatus) as refused:
                    async with asyncio.timeout(STEP_TIMEOUT):
                        async with ws_connect(url, **kwargs):
                            pass
                assert refused.value.response.status_code == status, name
            assert len(opened) == 1, "no refused connection reached the VNC socket"
    server_log = server_lines(caplog)
    assert "/console/localhost/web-1/ws?token=[redacted]" in server_log
    assert token.partition(".")[0] not in server_log


async def expect_policy_close(url: str, origin: str, name: str) -> None:
    async with asyncio.timeout(STEP_TIMEOUT):
        async with ws_connect(
            url, origin=websockets.Origin(origin), subprotocols=[websockets.Subprotocol("binary")]
        ) as ws:
            with pytest.raises(websockets.ConnectionClosedError) as closed:
                await ws.recv()
    assert closed.value.rcvd is not None, name
    assert closed.value.rcvd.code == 1008, name
    assert "invalid or has expired" in closed.value.rcvd.reason, name


async def test_websocket_closes_both_sides(tmp_path: Path) -> None:
    """Whichever side ends (the browser, a text frame, silence, the server shutting down), both are closed, and
    an ``open_vnc`` given as a context manager (holding, say, a lease on an SSH connection) is exited."""
    links = ConsoleLinks(SECRET)
    leases: list[str] = []
    async with echo_vnc(tmp_path) as (sock_path, received):

        @contextlib.asynccontextmanager
        async def open_vnc(grant: ConsoleGrant) -> AsyncIterator[socket.socket]:
            leases.append("held")
            try:
                yield await LocalHost().open_unix_socket(str(sock_path), timeout=5)
            finally:
                leases.append("released")

        async def vnc_closed(count: int) -> None:
            async def closed() -> bool:
                return received.count(EOF) >= count and leases.count("released") >= count

            await wait_for(f"the VNC side to be closed {count} times", closed)
            assert leases == ["held", "released"] * count

        token = links.sign("localhost", "web-1", str(tmp_path), "alice")
        async with serve(console_app(links, open_vnc, str(tmp_path), idle_timeout=0.5)) as base:
            origin = websockets.Origin(base)
            url = ws_url(base, "localhost", "web-1", token)
            async with asyncio.timeout(STEP_TIMEOUT):
                async with ws_connect(url, origin=origin) as ws:
                    await ws.send(b"ping")
                    assert await ws.recv() == b"ping"
            await vnc_closed(1)  # the browser closed

            async with asyncio.timeout(STEP_TIMEOUT), ws_connect(url, origin=origin) as ws:
                await ws.send("text")
                with pytest.raises(websockets.ConnectionClosedError) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
            await vnc_closed(2)

            quiet = time.monotonic()
            async with asyncio.timeout(STEP_TIMEOUT), ws_connect(url, origin=origin) as ws:
                with pytest.raises(websockets.ConnectionClosedOK) as idle:
                    await ws.recv()
            assert idle.value.rcvd is not None and "without traffic" in idle.value.rcvd.reason
            assert 0.4 < time.monotonic() - quiet < 5
            await vnc_closed(3)

        server = serve(console_app(links, open_vnc, str(tmp_path)))
        base = await server.__aenter__()
        origin = websockets.Origin(base)
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                ws = await ws_connect(ws_url(base, "localhost", "web-1", token), origin=origin)
            await ws.send(b"ping")
            assert await ws.recv() == b"ping"
        finally:
            await server.__aexit__(None, None, None)  # the server stops with the console open
        with pytest.raises(websockets.ConnectionClosed) as shut:
            async with asyncio.timeout(STEP_TIMEOUT):
                await ws.recv()
        assert shut.value.rcvd is not None and shut.value.rcvd.code == 1012  # uvicorn: service restart
        await vnc_closed(4)


async def test_websocket_reports_a_vm_without_display(tmp_path: Path) -> None:
    links = ConsoleLinks(SECRET)

    async def open_vnc(grant: ConsoleGrant) -> socket.socket:
        return await LocalHost().open_unix_socket(f"{grant.vm_dir}/{grant.vm}/vnc.sock", timeout=5)

    async with serve(console_app(links, open_vnc, str(tmp_path))) as base:
        token = links.sign("localhost", "web-1", str(tmp_path), "alice")
        async with asyncio.timeout(STEP_TIMEOUT):
            async with ws_connect(ws_url(base, "localhost", "web-1", token), origin=websockets.Origin(base)) as ws:
                with pytest.raises(websockets.ConnectionClosedError) as closed:
                    await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert "cannot reach the display of web-1" in closed.value.rcvd.reason
    with pytest.raises(SocketUnavailable):
        await open_vnc(ConsoleGrant("localhost", "web-1", str(tmp_path), "alice", 0))


# -- a real QEMU and a real Chromium --------------------------------------------------------------


@dataclass
class Qemu:
    qmp: QMPClient
    vnc_socket: Path
    workdir: Path


@contextlib.asynccontextmanager
async def vga_qemu() -> AsyncIterator[Qemu]:
    """q35 with a VGA card, nothing to boot (SeaBIOS's text screen), VNC and QMP on unix sockets."""
    workdir = Path(tempfile.mkdtemp(prefix="qmh-web-", dir="/tmp"))  # short: a socket path holds 107 bytes
    vnc, qmp_socket = workdir / "vnc.sock", workdir / "qmp.sock"
    argv = [
        QEMU, "-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
        "-device", "VGA", "-vnc", f"unix:{vnc}", "-qmp", f"unix:{qmp_socket},server=on,wait=off",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    qmp = QMPClient("test-web-console")
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not (vnc.exists() and qmp_socket.exists()):
                if proc.returncode is not None:
                    stderr = await proc.stderr.read() if proc.stderr else b""
                    pytest.fail(f"QEMU exited: {stderr.decode(errors='replace')}")
                await asyncio.sleep(0.02)
            await qmp.connect(str(qmp_socket))
        yield Qemu(qmp, vnc, workdir)
    finally:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await qmp.disconnect()
        finally:
            if proc.returncode is None:
                proc.kill()  # by PID: this QEMU only
            async with asyncio.timeout(STEP_TIMEOUT):
                await proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)


def _high_fd(fd: int) -> int:
    """``fd`` moved above 9, so that the shell's ``3<&N 4>&M`` cannot overwrite it (so bash: dash reads one digit)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe``: it reads commands on its fd 3, answers
    on its fd 4, each message a JSON object ended by a NUL byte."""

    FLAGS = (
        "--headless",
        "--no-sandbox",  # root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-breakpad",
        "--mute-audio",
        "--hide-scrollbars",
        "--force-color-profile=srgb",  # canvas pixels reach the screenshot unchanged
        "--window-size=1024,768",
        "--remote-debugging-pipe",
    )

    def __init__(
        self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader, writer: asyncio.WriteTransport
    ) -> None:
        self.proc = proc
        self._reader = reader
        self._writer = writer
        self._ids = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._dispatch = asyncio.create_task(self._read_loop())
        self.session: str | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, profile: Path, log: Path) -> AsyncIterator[Chromium]:
        assert CHROMIUM is not None
        to_chrome_r, to_chrome_w = (_high_fd(fd) for fd in os.pipe())
        from_chrome_r, from_chrome_w = (_high_fd(fd) for fd in os.pipe())
        commands = os.fdopen(to_chrome_w, "wb", buffering=0)
        answers = os.fdopen(from_chrome_r, "rb", buffering=0)
        argv = [
            "bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-',
            CHROMIUM, *cls.FLAGS, f"--user-data-dir={profile}", "about:blank",
        ]  # fmt: skip
        try:
            with open(log, "wb") as log_file:
                # Its own session: its zygote, renderer and utility processes are in its group, killed with it.
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    pass_fds=(to_chrome_r, from_chrome_w),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,
                )
        except BaseException:
            commands.close()
            answers.close()
            raise
        finally:
            os.close(to_chrome_r)
            os.close(from_chrome_w)
        chrome: Chromium | None = None
        try:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=64 << 20, loop=loop)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), answers)
            writer, _ = await loop.connect_write_pipe(asyncio.Protocol, commands)
            chrome = cls(proc, reader, writer)
            yield chrome
        finally:
            try:
                if chrome is not None:
                    chrome._dispatch.cancel()
                    await asyncio.gather(chrome._dispatch, return_exceptions=True)
            finally:
                # By PID: the group this Chromium leads (its zygote, renderer and utility processes).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                async with asyncio.timeout(STEP_TIMEOUT):
                    await proc.wait()
                commands.close()
                answers.close()

    async def _read_loop(self) -> None:
        while True:
            try:
                message = json.loads((await self._reader.readuntil(b"\0"))[:-1])
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                for waiting in self._pending.values():
                    if not waiting.done():
                        waiting.set_exception(RuntimeError(f"Chromium's DevTools pipe closed: {exc!r}"))
                return
            future = self._pending.get(message.get("id", -1))  # events (no id) are not needed
            if future is not None and not future.done():
                future.set_result(message)

    async def call(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False) -> Any:
        """One DevTools command (to the attached page unless ``browser``); its ``result``."""
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params or {}}
        if not browser:
            assert self.session is not None
            message["sessionId"] = self.session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = future
        self._writer.write(json.dumps(message).encode() + b"\0")
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                answer = await future
        finally:
            del self._pending[message["id"]]
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def attach_page(self) -> None:
        targets = await self.call("Target.getTargets", browser=True)
        page = next(t for t in targets["targetInfos"] if t["type"] == "page")
        attached = await self.call(
            "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}, browser=True
        )
        self.session = attached["sessionId"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']}")
        return result["result"].get("value")


#: The canvas noVNC draws on, as ``{w, h, rgba (base64)}``; ``null`` before noVNC has made it.
CANVAS_PIXELS = """(() => {
    const canvas = document.querySelector("#screen canvas");
    if (!canvas || !canvas.width) return null;
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let text = "";
    for (let i = 0; i < data.length; i += 0x8000) text += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
    return {w: canvas.width, h: canvas.height, rgba: btoa(text)};
})()"""
CANVAS_LIT = """(() => {
    const canvas = document.querySelector("#screen canvas");
    if (!canvas || !canvas.width) return false;
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < data.length; i += 4) if (data[i] | data[i + 1] | data[i + 2]) return true;
    return false;
})()"""


async def canvas_rgb(chrome: Chromium) -> tuple[int, int, bytes] | None:
    found = await chrome.evaluate(CANVAS_PIXELS)
    if found is None:
        return None
    return found["w"], found["h"], rgba_to_rgb(base64.b64decode(found["rgba"]))


async def wait_for(what: str, check: Callable[[], Awaitable[Any]], timeout: float = STEP_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def browser_prerequisites() -> Iterator[None]:
    missing = [
        what
        for what, present in (
            ("chromium", CHROMIUM is not None),
            (f"noVNC ({NOVNC_DIR}/core/rfb.js)", os.path.isfile(f"{NOVNC_DIR}/core/rfb.js")),
            (QEMU, shutil.which(QEMU) is not None),
        )
        if not present
    ]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup.sh --test (Debian: chromium, novnc)")
    yield


@pytest.mark.slow
async def test_browser_shows_the_guest_screen(browser_prerequisites: None, tmp_path: Path) -> None:
    """Headless Chromium opens the console page of a running VM; its canvas shows what QMP ``screendump`` shows."""
    started = time.monotonic()
    links = ConsoleLinks(SECRET)
    async with vga_qemu() as vm:

        async def open_vnc(grant: ConsoleGrant) -> socket.socket:
            assert (grant.host, grant.vm_dir) == ("localhost", str(vm.workdir))
            # "seabios" is the running VM; any other name is a VM without a display socket.
            path = vm.vnc_socket if grant.vm == "seabios" else vm.workdir / grant.vm / "vnc.sock"
            return await LocalHost().open_unix_socket(str(path), timeout=5)

        async with (
            serve(console_app(links, open_vnc, NOVNC_DIR)) as base,
            Chromium.launch(tmp_path / "profile", tmp_path / "chromium.log") as chrome,
        ):
            try:
                await chrome.attach_page()
                await chrome.call("Page.enable")
                await chrome.call(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": 1024, "height": 768, "deviceScaleFactor": 1, "mobile": False},
                )
                # Anything the page's Content-Security-Policy blocks is recorded (this script is not subject to it).
                await chrome.call(
                    "Page.addScriptToEvaluateOnNewDocument",
                    {
                        "source": "window.__csp = []; document.addEventListener('securitypolicyviolation', "
                        "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
                    },
                )
                token = links.sign("localhost", "seabios", str(vm.workdir), "test-client")
                navigated = time.monotonic()
                await chrome.call("Page.navigate", {"url": base + console_path("localhost", "seabios", token)})

                async def state() -> Any:
                    value = await chrome.evaluate("document.body ? document.body.dataset.state : null")
                    assert value not in ("failed", "disconnected"), await chrome.evaluate("document.body.innerText")
                    return value == "connected"

                await wait_for("noVNC to connect", state)
                connected = time.monotonic() - navigated

                async def lit() -> Any:
                    return await chrome.evaluate(CANVAS_LIT)

                await wait_for("the guest's screen on the canvas", lit)
                first_frame = time.monotonic() - navigated
                # The token left the address bar; the page's CSP blocked nothing noVNC needs.
                assert "token" not in await chrome.evaluate("location.href")
                assert await chrome.evaluate("window.__csp") == []

                # Let SeaBIOS finish its boot attempts (then its screen stays put for 60 s), and pause the VM:
                # the screen, blinking cursor included, stands still for the comparison.
                await asyncio.sleep(1.0)
                await vm.qmp.execute("stop")
                dump_path = vm.workdir / "screen.png"
                await vm.qmp.execute("screendump", {"filename": str(dump_path), "format": "png"})
                dump_w, dump_h, dump = png_rgb(dump_path.read_bytes())
                assert (dump_w, dump_h) == (720, 400)  # VGA text mode, 80x25 of 9x16
                lit_pixels = sum(1 for i in range(0, len(dump), 3) if dump[i : i + 3] != b"\0\0\0")
                assert lit_pixels > 1000, "SeaBIOS's text is on the screen"

                async def canvas_matches() -> Any:
                    canvas = await canvas_rgb(chrome)
                    if canvas is None or canvas[:2] != (dump_w, dump_h):
                        return False
                    return same_pixels(canvas[2], dump) >= SAME_PIXELS

                await wait_for("the canvas to show the screendump", canvas_matches)

                # The page as the browser renders it: a screenshot clipped to the canvas.
                rect = await chrome.evaluate(
                    "(() => { const r = document.querySelector('#screen canvas').getBoundingClientRect();"
                    " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
                )
                assert (rect["width"], rect["height"]) == (dump_w, dump_h), rect
                shot = await chrome.call(
                    "Page.captureScreenshot", {"format": "png", "clip": {**rect, "scale": 1}, "fromSurface": True}
                )
                shot_w, shot_h, pixels = png_rgb(base64.b64decode(shot["data"]))
                assert (shot_w, shot_h) == (dump_w, dump_h)
                similarity = same_pixels(pixels, dump)
                assert similarity >= SAME_PIXELS, similarity

                # A console that cannot open says why, on the page.
                token = links.sign("localhost", "stopped", str(vm.workdir), "test-client")
                await chrome.call("Page.navigate", {"url": base + console_path("localhost", "stopped", token)})

                async def failed() -> Any:
                    return await chrome.evaluate("document.body && document.body.dataset.state === 'failed'")

                await wait_for("the page to report the failure", failed)
                status = await chrome.evaluate("document.getElementById('status').textContent")
                assert status.startswith("Closed (1011): cannot reach the display of stopped: nothing listens"), status
            except BaseException:
                with contextlib.suppress(Exception):
                    print((tmp_path / "chromium.log").read_text(errors="replace")[-4000:])
                raise
    print(
        f"\nweb console: connected {connected:.2f} s and first frame {first_frame:.2f} s after navigation; "
        f"screenshot = screendump on {similarity:.2%} of the pixels; test {time.monotonic() - started:.1f} s"
    )
