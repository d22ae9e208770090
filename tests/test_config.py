"""Settings: defaults, environment, flags, validation."""

from __future__ import annotations

import pytest

from qemu_mcp_http.config import Settings, parse_settings
from qemu_mcp_http.mcp.context import AppContext
from qemu_mcp_http.vm.shared import SharedState


def test_defaults() -> None:
    s = parse_settings([], {})
    assert (s.host, s.port, s.vm_dir, s.accel) == ("127.0.0.1", 8000, "/var/lib/qemu", "auto")
    assert s.ssh_host_key_policy == "strict"


def test_environment_then_flags() -> None:
    env = {"QEMU_MCP_VM_DIR": "/srv/vms", "QEMU_MCP_PORT": "9000", "QEMU_MCP_ACCEL": "tcg"}
    s = parse_settings(["--port", "9100"], env)
    assert (s.vm_dir, s.port, s.accel) == ("/srv/vms", 9100, "tcg")


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="QEMU_MCP_PORT"):
        parse_settings([], {"QEMU_MCP_PORT": "eighty"})
    with pytest.raises(ValueError, match="vm_dir must be an absolute path"):
        parse_settings([], {"QEMU_MCP_VM_DIR": "vms"})
    with pytest.raises(ValueError, match="qmp_timeout must be a finite number > 0"):
        Settings(qmp_timeout=0)
    for text in ("nan", "inf", "-inf", "1e999"):  # float() accepts them all; a timeout of NaN never ends
        with pytest.raises(ValueError, match="stop_timeout must be a finite number"):
            parse_settings([], {"QEMU_MCP_STOP_TIMEOUT": text})
    with pytest.raises(ValueError, match="accel must be one of"):
        Settings(accel="hvf")  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        parse_settings(["--accel", "hvf"], {})


def test_qmp_idle_hold_reaches_the_qmp_pool() -> None:
    """Replicas sharing a vm_dir set a short hold (deploy/compose.replicas.yaml): the setting is what the QMP
    pool uses, and a hold of 0 or less is refused like any other duration."""
    s = parse_settings([], {"QEMU_MCP_QMP_IDLE_HOLD": "0.05", "QEMU_MCP_VM_DIR": "/tmp"})
    assert s.qmp_idle_hold == 0.05
    app = AppContext(settings=s, shared=SharedState())
    assert app.shared.qmp.idle_timeout == 0.05
    with pytest.raises(ValueError, match="qmp_idle_hold must be a finite number > 0"):
        parse_settings([], {"QEMU_MCP_QMP_IDLE_HOLD": "0"})
