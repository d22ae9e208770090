"""The container image, end to end: build it with podman, run it as documented, drive it with the real MCP client.

Builds ``debian:bookworm-slim`` from Debian packages when podman lacks it (deploy/build-base-image.sh:
debootstrap from this machine's apt mirror, root file system cached under ~/.cache/qemu-mcp-http), then the
project image (runc, cgroupfs, ``--pull=never``, host network), runs it on the host network on a free loopback
port with a mounted token file, and creates / starts / lists / stops / deletes VMs inside it (the VM directory
is the container's volume).  Needs root and the Debian packages podman, runc, debootstrap (``scripts/setup.sh
--test`` installs them); skipped without podman or with ``QEMU_MCP_SKIP_CONTAINER=1``.  Time on a 2-core CI
machine: 1.5 to 2.5 min from an empty image store (base image included), 15 to 25 s with cached layers.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from qemu_mcp_http.mcp.tools import TOOLS

from .container.podman import (
    IMAGE,
    REPO,
    ULIMITS,
    build_image,
    ensure_base_image,
    inspect,
    logs,
    missing_tools,
    podman,
    remove_container,
    run_container,
)
from .support import free_port, open_tools

pytestmark = [
    pytest.mark.skipif(os.environ.get("QEMU_MCP_SKIP_CONTAINER") == "1", reason="QEMU_MCP_SKIP_CONTAINER=1"),
    pytest.mark.skipif(
        shutil.which("podman") is None,
        reason="podman is not installed (scripts/setup.sh --test installs podman runc debootstrap)",
    ),
]

UID = 10001
TOKEN_PATH = "/run/secrets/qemu-mcp-token"


@dataclass
class Running:
    name: str
    port: int
    token: str
    started: float

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The project image, built from this checkout; its ID."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"podman is installed but the container test also needs: {' '.join(missing)} (apt-get install)")
    workdir = Path(tempfile.mkdtemp(prefix="qmh-build-"))
    try:
        base_seconds = ensure_base_image()
        build = build_image(REPO, IMAGE, workdir)
        print(f"\ncontainer: base image {base_seconds:.1f} s, image build {build.seconds:.1f} s")
        yield build.image_id
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def running_container(image: str, extra: Sequence[str] = ()) -> Iterator[Running]:
    """The image running as documented: hardened, host network, loopback port, token file mounted read-only.

    The container (and its volume) is removed on the way out, whatever happened.
    """
    secrets_dir = Path(tempfile.mkdtemp(prefix="qmh-secrets-"))
    token = secrets.token_urlsafe(32)
    token_file = secrets_dir / "qemu-mcp-token"
    token_file.write_text(f"# client-id token\nci-container {token}\n")
    # A bind mount keeps the file's owner and mode: the container user (uid 10001) must be able to read it.
    try:
        os.chown(token_file, UID, UID)
        os.chmod(token_file, 0o600)
    except PermissionError:
        os.chmod(token_file, 0o644)
        os.chmod(secrets_dir, 0o755)
    name = f"qmh-test-{secrets.token_hex(4)}"
    port = free_port()
    try:
        started = time.monotonic()
        run_container(
            name,
            image,
            # The image binds 0.0.0.0; on the host network the test keeps the port on loopback.
            env={"QEMU_MCP_HOST": "127.0.0.1", "QEMU_MCP_PORT": str(port)},
            mounts=[f"{token_file}:{TOKEN_PATH}:ro"],
            extra=extra,
        )
        yield Running(name, port, token, started)
    finally:
        remove_container(name)
        shutil.rmtree(secrets_dir, ignore_errors=True)


@pytest.fixture
def container(image: str) -> Iterator[Running]:
    with running_container(image) as running:
        yield running


def wait_healthy(running: Running, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{running.base}/healthz", timeout=2)
            if response.status_code == 200:
                body: dict[str, Any] = response.json()
                return body
        except httpx.HTTPError:
            pass
        state = inspect(running.name)["State"]
        if not state.get("Running"):
            pytest.fail(f"container exited ({state.get('ExitCode')}):\n{logs(running.name)}")
        time.sleep(0.1)
    pytest.fail(f"/healthz did not answer within {timeout:g} s:\n{logs(running.name)}")


def process_table(name: str) -> list[dict[str, str]]:
    """Every process in the container: ``{pid, uid, state, rss_kib, cmdline}`` read from its /proc."""
    script = (
        "for d in /proc/[0-9]*; do "
        'printf "%s|%s|%s|%s|%s\\n" "${d#/proc/}" '
        "\"$(awk '/^Uid:/ {print $2}' $d/status)\" \"$(awk '/^State:/ {print $2}' $d/status)\" "
        "\"$(awk '/^VmRSS:/ {print $2}' $d/status)\" \"$(tr '\\0' ' ' <$d/cmdline)\"; "
        "done 2>/dev/null"
    )
    rows = []
    for line in podman("exec", name, "sh", "-c", script).stdout.splitlines():
        pid, uid, state, rss, cmdline = line.split("|", 4)
        if cmdline.startswith("sh -c") or cmdline.startswith("awk") or cmdline.startswith("tr ") or not cmdline:
            continue  # this probe itself (or a process that ended while it read)
        rows.append({"pid": pid, "uid": uid, "state": state, "rss_kib": rss, "cmdline": cmdline.strip()})
    return rows


def test_image_config(image: str) -> None:
    """Non-root user, port, volume, stop signal, healthcheck, bind/token settings; no pip secret baked in."""
    data = inspect(image, kind="image")
    config = data["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert config["User"] in (str(UID), f"{UID}:{UID}", "qemu"), config["User"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/var/lib/qemu" in config["Volumes"]
    assert config["StopSignal"] in ("SIGINT", "2", "INT")
    assert config["Entrypoint"][:2] == ["/usr/bin/tini", "--"], config["Entrypoint"]
    assert env["QEMU_MCP_HOST"] == "0.0.0.0"
    assert env["QEMU_MCP_VM_DIR"] == "/var/lib/qemu"
    assert env["QEMU_MCP_TOKEN_FILE"] == TOKEN_PATH
    assert "QEMU_MCP_TOKEN" not in env
    # Nothing of the build's pip settings or secrets is baked in.
    assert not [key for key in env if key.startswith("PIP_")], env
    # The pip secrets are used in the builder stage only: the final image's layers never saw them.
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "pip_ca" not in history and "pip_conf" not in history, history
    healthcheck = data.get("Healthcheck") or config.get("Healthcheck")
    assert healthcheck, "no HEALTHCHECK: build with --format docker (the OCI image format drops it)"
    assert "/healthz" in " ".join(healthcheck["Test"])


def test_refuses_open_bind_without_token(image: str) -> None:
    """The image binds 0.0.0.0: without a token file the server refuses to start (exit 2) and says why."""
    name = f"qmh-test-{secrets.token_hex(4)}"
    try:
        proc = podman(
            "run",
            "--name",
            name,
            "--network=host",
            "--health-interval=disable",
            *(f"--ulimit={ulimit}" for ulimit in ULIMITS),
            "-e",
            "QEMU_MCP_TOKEN_FILE=",
            "-e",
            f"QEMU_MCP_PORT={free_port()}",
            image,
            check=False,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "loopback" in proc.stderr and "token" in proc.stderr, proc.stderr
    finally:
        remove_container(name)


async def test_container_end_to_end(container: Running) -> None:
    """Health, auth, the three tools and a VM lifecycle inside the container, non-root, prompt stop."""
    health = wait_healthy(container)
    healthy_seconds = time.monotonic() - container.started
    assert health["status"] == "ok", health
    assert health["vm_dir"] == "/var/lib/qemu"
    assert health["accel_setting"] == "auto", health

    # /mcp needs the token; /healthz does not.
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(f"{container.base}/mcp", json={})).status_code == 401
        bad = {"Authorization": "Bearer " + "x" * len(container.token)}
        assert (await http.post(f"{container.base}/mcp", json={}, headers=bad)).status_code == 401

    # Hardened as documented: no capabilities, no privilege gain, a read-only root file system.
    status = podman("exec", container.name, "cat", "/proc/1/status").stdout
    assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE) and re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)
    assert podman("exec", container.name, "touch", "/opt/x", check=False).returncode != 0

    idle = process_table(container.name)
    server_rss = sum(int(p["rss_kib"] or 0) for p in idle)

    name = "ctr-vm"
    auth = {"Authorization": f"Bearer {container.token}"}
    async with open_tools(f"{container.base}/mcp", headers=auth) as tools:
        listed = await tools.client.list_tools()
        assert sorted(tool.name for tool in listed.tools) == sorted(spec.name for spec in TOOLS)

        created = await tools.ok("manage_vm", name=name, action="create", arch="x86_64", memory="64M", vcpus=1)
        assert created["data"]["details"]["directory"] == f"/var/lib/qemu/{name}"
        listing = podman("exec", container.name, "ls", "-ln", "/var/lib/qemu").stdout
        assert re.search(rf"\s{UID}\s+{UID}\s.*\s{name}$", listing, re.MULTILINE), listing

        started = await tools.ok("manage_vm", name=name, action="start")
        assert started["data"]["details"]["status"] == "running", started
        # No --device /dev/kvm here, so the probe settles on TCG.
        assert started["data"]["details"]["accel"] == "tcg", started

        # arm64 too: the image's AAVMF firmware is what the server's argv names.
        arm = await tools.ok("manage_vm", name="ctr-arm", action="create", arch="arm64", memory="64M", vcpus=1)
        assert arm["data"]["details"]["arch"] == "arm64", arm
        await tools.ok("manage_vm", name="ctr-arm", action="start")

        running = await tools.ok("list_vms", status="running")
        assert sorted(vm["name"] for vm in running["data"]["vms"]) == ["ctr-arm", name], running

        # Every process, the QEMUs included, runs as the unprivileged user.
        table = process_table(container.name)
        assert {p["uid"] for p in table} == {str(UID)}, table
        assert sum("qemu-system-" in p["cmdline"] for p in table) == 2, table

        stopped = await tools.ok("manage_vm", name=name, action="stop", stop_timeout=1)
        assert stopped["data"]["details"]["status"] == "stopped", stopped
        # tini (PID 1) reaps the daemonized QEMU that was re-parented to it: no zombie is left.
        assert not [p for p in process_table(container.name) if p["state"] == "Z"]
        everything = await tools.ok("list_vms", status="all")
        states = {vm["name"]: vm["status"] for vm in everything["data"]["vms"]}
        assert states == {name: "stopped", "ctr-arm": "running"}, everything

        deleted = await tools.ok("manage_vm", name=name, action="delete")
        assert f"/var/lib/qemu/{name}" in deleted["data"]["details"]["removed"], deleted
        assert [vm["name"] for vm in (await tools.ok("list_vms", status="all"))["data"]["vms"]] == ["ctr-arm"]

    health = httpx.get(f"{container.base}/healthz", timeout=5).json()
    assert str(health["accel"].get("localhost/x86_64", "")).startswith("tcg"), health
    log_text = logs(container.name)
    assert re.search(r"accelerator for x86_64 guests on localhost: tcg", log_text), log_text
    assert container.token not in log_text

    # HEALTHCHECK, run on demand (podman's periodic runs need systemd timers, absent on these machines).
    check = podman("healthcheck", "run", container.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert inspect(container.name)["State"]["Health"]["Status"] == "healthy"

    # STOPSIGNAL SIGINT reaches the server through tini: a graceful exit, with the arm64 VM still running.
    began = time.monotonic()
    podman("stop", "--time", "20", container.name, timeout=60)
    stop_seconds = time.monotonic() - began
    state = inspect(container.name)["State"]
    # 130 would be a KeyboardInterrupt: after its graceful shutdown uvicorn re-raises the SIGINT it handled,
    # and the server must suppress it (as uvicorn.run does).
    assert state["ExitCode"] == 0, (state["ExitCode"], logs(container.name))
    assert stop_seconds < 10, stop_seconds
    assert "Application shutdown complete" in logs(container.name)
    print(
        f"\ncontainer: healthy {healthy_seconds:.2f} s after podman run, idle RSS {server_rss / 1024:.1f} MiB "
        f"(all processes), stop {stop_seconds:.2f} s"
    )


#: KVM_GET_API_VERSION: answers 12 on every Linux with KVM.
_KVM_API_PROBE = "import fcntl, os; print(fcntl.ioctl(os.open('/dev/kvm', os.O_RDWR), 0xAE00))"


async def test_kvm_device(image: str, tmp_path: Path) -> None:
    """``--device /dev/kvm --group-add <its gid>``: the unprivileged user opens KVM and the server probes it.

    The host's /dev/kvm may be root-only (it is on the CI machines); a node of the same device owned by a
    group, mode 0660 as udev creates it on a usual host, stands in for it.
    """
    if not os.path.exists("/dev/kvm"):
        pytest.skip("this machine has no /dev/kvm")
    rdev = os.stat("/dev/kvm").st_rdev
    node = tmp_path / "kvm"
    gid = 4242
    try:
        os.mknod(node, 0o660 | stat.S_IFCHR, rdev)
        os.chown(node, 0, gid)
        os.chmod(node, 0o660)
    except PermissionError:
        pytest.skip("creating a device node needs root")
    os.chmod(tmp_path, 0o755)
    with running_container(image, extra=["--device", f"{node}:/dev/kvm", "--group-add", str(gid)]) as running:
        wait_healthy(running)
        assert str(gid) in podman("exec", running.name, "id", "-G").stdout.split()
        assert podman("exec", running.name, "python3", "-c", _KVM_API_PROBE).stdout.strip() == "12"
        auth = {"Authorization": f"Bearer {running.token}"}
        async with open_tools(f"{running.base}/mcp", headers=auth) as tools:
            await tools.ok("manage_vm", name="kvm-vm", action="create", arch="x86_64", memory="64M", vcpus=1)
            started = await tools.ok("manage_vm", name="kvm-vm", action="start")
            await tools.ok("manage_vm", name="kvm-vm", action="delete", stop_timeout=1)
        # KVM where the probe shows it runs guests; TCG otherwise (a nested KVM), and /healthz says why.
        choice = str(httpx.get(f"{running.base}/healthz", timeout=5).json()["accel"]["localhost/x86_64"])
        assert choice.split()[0] == started["data"]["details"]["accel"], (choice, started)
        assert choice.startswith("kvm") or "not writable" not in choice, choice
