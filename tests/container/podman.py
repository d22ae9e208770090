"""Podman for the container test: the settings this machine kind needs, the base image, the build, the run.

Every podman call goes through :func:`podman`: runc and cgroupfs given explicitly (crun fails on the hybrid
cgroup hierarchy of these machines, and they run no systemd session), with ``CONTAINERS_CONF`` pointing at
``deploy/containers.conf`` (explicit rlimits, file events log) unless the caller's environment names one.
Nothing here uses podman's default network: builds and containers use the host's (no bridge, no firewall
rules created on the host).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_IMAGE",
    "DEPLOY",
    "IMAGE",
    "LABEL",
    "REPO",
    "HARDENING",
    "ULIMITS",
    "Build",
    "PipInputs",
    "build_image",
    "ensure_base_image",
    "inspect",
    "logs",
    "missing_tools",
    "pip_inputs",
    "podman",
    "remove_container",
    "run_container",
]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
IMAGE = "localhost/qemu-mcp-http:test"
#: Set on the images the test builds, so that replaced ones can be found and removed.
LABEL = "io.github.qemu-mcp-http.test-image"
#: The rlimits of deploy/containers.conf, also passed explicitly: without them runc fails here with
#: "error setting rlimits" (podman's default nofile exceeds the host's hard limit).
ULIMITS = ("nofile=4096:4096", "nproc=4096:4096")
#: The hardening deploy/README.md documents: nothing in the image is written at run time but the volume.
HARDENING = ("--read-only", "--tmpfs", "/tmp", "--cap-drop=all", "--security-opt", "no-new-privileges")
_KEEP_REPLACED_SECONDS = 15 * 60
_GLOBAL = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(DEPLOY / "containers.conf"))
    return env


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``podman args...``; on failure raise with the command's output (its tail) in the message.

    :raise RuntimeError: podman exited non-zero (with ``check``) or took longer than ``timeout`` seconds.
    """
    argv = ["podman", *_GLOBAL, *args]
    try:
        proc = subprocess.run(argv, env=podman_env(), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(argv)} timed out after {timeout:g} s") from exc
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None or Path("/usr/sbin", tool).exists()


def missing_tools() -> list[str]:
    """The Debian packages of the container test that are not installed (debootstrap: only if needed)."""
    missing = [tool for tool in ("podman", "runc") if not _have(tool)]
    if not missing and not _have("debootstrap") and podman("image", "exists", BASE_IMAGE, check=False).returncode:
        missing.append("debootstrap")
    return missing


def ensure_base_image() -> float:
    """Import ``debian:bookworm-slim`` from a debootstrapped root file system unless present; seconds taken.

    :raise RuntimeError: deploy/build-base-image.sh failed (its output is in the message).
    """
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return 0.0
    began = time.monotonic()
    try:
        proc = subprocess.run(
            ["bash", str(DEPLOY / "build-base-image.sh")],
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError("deploy/build-base-image.sh timed out") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"deploy/build-base-image.sh failed:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return time.monotonic() - began


# -- pip settings for the build ----------------------------------------------------------------------------

#: pip options carried into the image build; file:// locations are bind-mounted at the same path.
_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "proxy", "timeout", "default-timeout")


@dataclass
class PipInputs:
    """What the image build needs to reach the same package index as this machine's pip."""

    config: dict[str, str] = field(default_factory=dict)
    ca_file: str | None = None
    mounts: list[str] = field(default_factory=list)

    def write_config(self, path: Path) -> Path | None:
        """Write the carried options as a pip config file (the build's ``pip_conf`` secret); None if none."""
        if not self.config:
            return None
        parser = configparser.ConfigParser(interpolation=None)
        parser["global"] = self.config
        with path.open("w") as f:
            parser.write(f)
        return path


def parse_pip_config_list(output: str) -> dict[str, str]:
    """``pip config list`` lines (``global.index-url='…'``, ``:env:.find-links='…'``) as ``{option: value}``."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            # Later lines win: pip lists files first, then PIP_* variables, which override them.
            found[key.rpartition(".")[2]] = value.strip().strip("'\"")
    return found


def pip_inputs() -> PipInputs:
    """This machine's pip index/proxy/CA settings (pip config files and PIP_* variables), for the build."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
    )
    found = parse_pip_config_list(proc.stdout)
    inputs = PipInputs()
    cert = found.get("cert")
    if cert and Path(cert).is_file():
        inputs.ca_file = cert
    for key in _PIP_KEYS:
        if found.get(key):
            inputs.config[key] = found[key]
    for key in ("extra-index-url", "find-links", "index-url"):
        kept = []
        for location in inputs.config.get(key, "").split():
            if not (location.startswith("file://") or location.startswith("/")):
                kept.append(location)
                continue
            # A local index or wheel directory; a PEP 503 ".../simple" links to files beside it.
            local = Path(location.removeprefix("file://").rstrip("/"))
            if not local.is_dir():
                continue  # absent here, so absent in the build too: pip would only warn once per package
            kept.append(location)
            top = local.parent if local.name == "simple" else local
            if str(top) not in inputs.mounts:
                inputs.mounts.append(str(top))
        if kept:
            inputs.config[key] = " ".join(kept)
        else:
            inputs.config.pop(key, None)
    return inputs


# -- the build ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    image_id: str
    seconds: float
    log_tail: str


def build_image(context: Path, tag: str, workdir: Path) -> Build:
    """``podman build`` the project image (docker format, so HEALTHCHECK is kept), tagged ``tag``.

    Images of earlier builds that this or other builds replaced are removed (:func:`remove_replaced_images`),
    so repeated runs do not pile up images; the cached layers stay.

    :raise RuntimeError: the build failed (the log's tail is in the message).
    """
    inputs = pip_inputs()
    iidfile = workdir / "image-id"
    args = ["build", "--format", "docker", "--pull=never", "--network=host", "--jobs=2", "--iidfile", str(iidfile)]
    args += ["--label", f"{LABEL}=1", "-t", tag]
    if inputs.ca_file:
        args += ["--secret", f"id=pip_ca,src={inputs.ca_file}"]
    conf = inputs.write_config(workdir / "pip.conf")
    if conf is not None:
        args += ["--secret", f"id=pip_conf,src={conf}"]
    for mount in inputs.mounts:
        args += ["-v", f"{mount}:{mount}:ro"]
    began = time.monotonic()
    proc = podman(*args, str(context), timeout=1200)
    seconds = time.monotonic() - began
    image_id = iidfile.read_text().strip().removeprefix("sha256:")
    remove_replaced_images()
    return Build(image_id, seconds, (proc.stdout + proc.stderr)[-3000:])


def remove_replaced_images() -> None:
    """Remove the test images that later builds replaced, unless something may still use them.

    Only untagged images with :data:`LABEL` (``podman rmi <id>`` of a tagged image would drop its tags),
    not used by a container (podman refuses), and built over 15 minutes ago (a concurrent test run from
    another checkout may be about to start a recent one).  Their layers shared with newer images stay.
    """
    listing = podman(
        "images", "--filter", f"label={LABEL}", "--filter", "dangling=true", "--format", "{{.ID}}", check=False
    )
    for image_id in listing.stdout.split():
        created = podman("image", "inspect", "--format", "{{.Created.Unix}}", image_id, check=False).stdout.strip()
        if created.isdigit() and time.time() - int(created) > _KEEP_REPLACED_SECONDS:
            podman("rmi", image_id, check=False)


# -- a running container -----------------------------------------------------------------------------------


def run_container(
    name: str, image: str, env: Mapping[str, str], mounts: Sequence[str], extra: Sequence[str] = ()
) -> str:
    """``podman run -d`` hardened, on the host network (no bridge or firewall rules needed); the container ID.

    Periodic healthchecks are off (podman runs them from systemd timers, absent here); ``podman healthcheck
    run`` still runs the image's HEALTHCHECK on demand.

    :raise RuntimeError: podman could not create or start the container.
    """
    args = ["run", "-d", "--name", name, "--network=host", "--health-interval=disable", *HARDENING, *extra]
    for ulimit in ULIMITS:
        args += ["--ulimit", ulimit]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    for mount in mounts:
        args += ["-v", mount]
    return podman(*args, image, timeout=120).stdout.strip()


def inspect(ref: str, kind: str = "container") -> dict[str, Any]:
    """``podman <kind> inspect ref``: the first (only) object."""
    data = json.loads(podman(kind, "inspect", ref).stdout)
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise RuntimeError(f"podman {kind} inspect {ref}: unexpected output {data!r}")
    result: dict[str, Any] = data[0]
    return result


def logs(ref: str) -> str:
    """The container's output (its tail)."""
    proc = podman("logs", ref, check=False)
    return (proc.stdout + proc.stderr)[-8000:]


def remove_container(ref: str) -> None:
    """Remove the container and its anonymous volume (the VM directory), whatever state it is in."""
    podman("rm", "--force", "--volumes", "--time", "5", ref, check=False, timeout=60)
