"""The README's two commands on a machine that has nothing: a fresh clone in a bare Debian 12 container.

Two containers from the debootstrapped ``debian:bookworm-slim`` base (deploy/build-base-image.sh: no Python, no
QEMU, no apt lists, no pip or apt caches) run at once, each on a fresh ``git clone`` of this repository:

- the serve command, ``bash scripts/serve --host 127.0.0.1 --port N``, which must install everything itself (apt,
  the venv from requirements/runtime.txt) and then answer ``/healthz`` and a ``list_vms`` call through the real
  MCP client;
- the set-up part of the test command, ``bash scripts/test --static`` (apt, the venv from requirements/test.txt,
  the lock check, ruff, mypy --strict), which must exit 0.

They reach apt's mirror and pip's index the way this machine does (host network; pip's index, proxy and CA
settings carried in as files, see :func:`pip_inputs`); nothing else of this machine is visible inside.  This
proves that the locks install, as pinned and hashed, on a fresh machine whatever has been released since they
were made.  Skipped like the container test (no podman, ``QEMU_MCP_SKIP_CONTAINER=1``).  Takes the time of the
test command's set-up from nothing: 4 to 8 minutes on a 2-core machine, most of it apt.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest

from .container.podman import BASE_IMAGE, REPO, ULIMITS, ensure_base_image, missing_tools, pip_inputs, podman
from .support import free_port, open_tools

pytestmark = [
    pytest.mark.skipif(os.environ.get("QEMU_MCP_SKIP_CONTAINER") == "1", reason="QEMU_MCP_SKIP_CONTAINER=1"),
    pytest.mark.skipif(
        shutil.which("podman") is None,
        reason="podman is not installed (scripts/setup.sh --test installs podman runc debootstrap)",
    ),
]

#: From nothing: apt (QEMU, and for the tests Chromium, podman, Node.js...) and pip; generous for a slow mirror.
SETUP_TIMEOUT = 30 * 60


@dataclass
class Machine:
    """A bare container running one of the README's commands in its own fresh clone."""

    name: str
    clone: Path

    def state(self) -> dict[str, object]:
        out = podman("inspect", "--format", "{{json .State}}", self.name, check=False).stdout.strip()
        state: dict[str, object] = json.loads(out) if out else {}
        return state

    def output(self) -> str:
        """Everything the command printed, stdout and stderr interleaved as they came."""
        proc = podman("logs", self.name, check=False)
        # podman logs replays the container's stdout on its stdout and stderr on its stderr: order by line
        # is lost, so the two are given one after the other.
        return proc.stdout + proc.stderr

    def logs(self) -> str:
        """The tail of the output, without pip's notes on index locations this machine lacks."""
        lines = [line for line in self.output().splitlines() if not line.startswith("WARNING: Location")]
        return "\n".join(lines)[-6000:]


def _start(machine: Machine, command: str, workdir: Path) -> None:
    """Run ``command`` in a fresh clone, in a bare container on the host network, as root (as on a new machine)."""
    machine.clone.parent.mkdir(parents=True)
    # What CI and a new user get: the committed state (not this work tree), cloned.
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(machine.clone)], check=True, timeout=120)
    inputs = pip_inputs()
    args = ["run", "-d", "--name", machine.name, "--network=host", "--workdir", "/src", "-v", f"{machine.clone}:/src"]
    for ulimit in ULIMITS:
        args += ["--ulimit", ulimit]
    # pip's index and proxy settings of this machine, as a config file and a CA bundle at paths of their own:
    # the container's /etc/ssl stays its own (apt's ca-certificates package writes it).
    conf = inputs.write_config(workdir / f"{machine.name}-pip.conf")
    if conf is not None:
        args += ["-v", f"{conf}:/run/pip.conf:ro", "-e", "PIP_CONFIG_FILE=/run/pip.conf"]
    if inputs.ca_file:
        args += ["-v", f"{inputs.ca_file}:/run/pip-ca.pem:ro", "-e", "PIP_CERT=/run/pip-ca.pem"]
    for mount in inputs.mounts:
        args += ["-v", f"{mount}:{mount}:ro"]
    podman(*args, BASE_IMAGE, "bash", "-c", command, timeout=120)


@dataclass
class Machines:
    serve: Machine
    test: Machine
    port: int
    workdir: Path
    #: time.monotonic() when they were started
    started: float = field(default_factory=time.monotonic)

    def remove(self) -> None:
        for machine in (self.serve, self.test):
            podman("rm", "--force", "--time", "5", machine.name, check=False, timeout=120)
        # The clones hold root-owned files made inside (venvs): plain rmtree works as root, which the test is.
        shutil.rmtree(self.workdir, ignore_errors=True)


#: Started by :func:`start_early` when the session collects these tests, so that the set-up from nothing
#: (minutes, mostly apt's downloads) overlaps the rest of the suite; the tests run last (tests/conftest.py).
_early: Machines | str | None = None


def start_machines() -> Machines:
    """Both bare machines, started at once (their apt and pip work overlaps).

    :raise RuntimeError: podman or the base image is not usable (the message says why).
    """
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"podman is installed but this test also needs: {' '.join(missing)} (apt-get install)")
    ensure_base_image()
    ulimits = [arg for ulimit in ULIMITS for arg in ("--ulimit", ulimit)]
    probe = podman("run", "--rm", *ulimits, BASE_IMAGE, "dpkg-query", "-W", "-f=${Status}", "python3", check=False)
    if "install ok installed" in probe.stdout:
        raise RuntimeError(f"{BASE_IMAGE} is not bare: it has python3 (rebuild: deploy/build-base-image.sh --force)")
    workdir = Path(tempfile.mkdtemp(prefix="qmh-fresh-"))
    suffix = secrets.token_hex(4)
    port = free_port()
    serve = Machine(f"qmh-fresh-serve-{suffix}", workdir / "serve" / "qemu-mcp-http")
    test = Machine(f"qmh-fresh-test-{suffix}", workdir / "test" / "qemu-mcp-http")
    machines = Machines(serve, test, port, workdir)
    try:
        _start(serve, f"exec bash scripts/serve --host 127.0.0.1 --port {port}", workdir)
        _start(test, "bash scripts/test --static", workdir)
    except BaseException:
        machines.remove()
        raise
    return machines


def start_early() -> None:
    """Start the machines now, in the background of the rest of the session (a failure is kept for the tests)."""
    global _early
    if _early is None and _enabled():
        try:
            _early = start_machines()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            _early = f"{exc}"


def remove_early() -> None:
    """Remove what :func:`start_early` started, if the tests did not (deselected, interrupted)."""
    global _early
    if isinstance(_early, Machines):
        _early.remove()
    _early = None


def _enabled() -> bool:
    return os.environ.get("QEMU_MCP_SKIP_CONTAINER") != "1" and shutil.which("podman") is not None


@pytest.fixture(scope="module")
def machines() -> Iterator[Machines]:
    """The machines :func:`start_early` started (or started now); removed whatever happens."""
    global _early
    started, _early = _early, None
    if isinstance(started, str):
        pytest.fail(started)
    try:
        if started is None:
            started = start_machines()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield started
    finally:
        started.remove()


async def test_serve_command_on_a_bare_machine(machines: Machines) -> None:
    """`bash scripts/serve` from a fresh clone installs everything, then /healthz and list_vms answer."""
    serve = machines.serve
    base = f"http://127.0.0.1:{machines.port}"
    began = machines.started
    health: dict[str, object] | None = None
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() - began < SETUP_TIMEOUT:
            if serve.state().get("Running") is not True:
                pytest.fail(f"the serve command exited on the bare machine:\n{serve.logs()}")
            try:
                reply = await http.get(f"{base}/healthz")
            except httpx.TransportError:
                reply = None
            if reply is not None and reply.status_code == 200:
                health = reply.json()
                break
            await asyncio.sleep(5)
    assert health is not None, f"no /healthz answer after {SETUP_TIMEOUT} s:\n{serve.logs()}"
    print(f"\nfresh machine: the serve command answered /healthz after {time.monotonic() - began:.0f} s")
    assert health["status"] == "ok", health
    async with open_tools(f"{base}/mcp") as tools:
        listed = await tools.ok("list_vms")
    assert listed["data"]["vms"] == [], listed
    # What it installed is the lock, exactly: pip reports the pinned versions.
    frozen = podman("exec", serve.name, ".venv/bin/python", "-m", "pip", "freeze", "--exclude-editable").stdout
    assert _pins(frozen) <= _pins((serve.clone / "requirements/runtime.txt").read_text()), frozen


async def test_test_command_setup_on_a_bare_machine(machines: Machines) -> None:
    """`bash scripts/test --static` from a fresh clone: apt, the venv from the lock, the lock check, ruff, mypy."""
    test = machines.test
    began = machines.started
    while time.monotonic() - began < SETUP_TIMEOUT:
        state = test.state()
        if state.get("Running") is not True and state.get("Status") in ("exited", "stopped"):
            break
        await asyncio.sleep(5)
    else:
        pytest.fail(f"`bash scripts/test --static` took over {SETUP_TIMEOUT} s:\n{test.logs()}")
    output = test.output()
    assert state.get("ExitCode") == 0, f"`bash scripts/test --static` failed on the bare machine:\n{test.logs()}"
    for stage in ("== lock", "== ruff", "== mypy --strict"):
        assert stage in output, test.logs()
    assert "Success: no issues found" in output, test.logs()
    print(f"\nfresh machine: the test command's set-up and checks passed in {time.monotonic() - began:.0f} s")


def _pins(text: str) -> set[tuple[str, str]]:
    """``(name, version)`` of every ``name==version`` line (a lock, or ``pip freeze``), names normalised."""
    found = set()
    for line in text.splitlines():
        head = line.split(";")[0].split("\\")[0].strip()
        name, sep, version = head.partition("==")
        if sep and not line.startswith(("#", " ")):
            found.add((name.strip().lower().replace("_", "-").replace(".", "-"), version.strip()))
    return found
