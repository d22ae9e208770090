"""The dependency locks: scripts/check_lock.py on the real files and on broken ones, and the venv they made."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_lock", REPO / "scripts" / "check_lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_lock"] = module
    spec.loader.exec_module(module)
    return module


check_lock = _load_checker()

PYPROJECT: dict[str, Any] = {
    "build-system": {"requires": ["setuptools>=68"]},
    "project": {
        "dependencies": ["redis>=5.0.1,<9", "mcp>=2.3,<3"],
        "optional-dependencies": {"test": ["pytest>=9,<10"]},
    },
}
H = "    --hash=sha256:" + "a" * 64
RUNTIME = f"redis==8.2.0 \\\n{H}\nmcp==2.3.0 \\\n{H}\n    # via x\nsetuptools==84.2.1 \\\n{H}\n"
TEST = RUNTIME + f"pytest==9.2.0 \\\n{H}\n"


def _locks(test: str = TEST, runtime: str = RUNTIME) -> dict[str, str]:
    return {"test": test, "runtime": runtime}


def test_the_repository_locks_satisfy_pyproject() -> None:
    """The committed locks pin every requirement of pyproject.toml (else: bash scripts/lock)."""
    with (REPO / "pyproject.toml").open("rb") as f:
        pyproject = tomllib.load(f)
    locks = {kind: (REPO / path).read_text() for kind, path in check_lock.LOCKS.items()}
    assert check_lock.check(pyproject, locks) == []


def test_the_venv_is_the_lock() -> None:
    """What scripts/setup.sh installed is exactly what requirements/test.txt pins (hash-checked by pip)."""
    pins = check_lock.parse_lock((REPO / "requirements" / "test.txt").read_text())
    wrong = []
    for pin in pins:
        if pin.marker:
            continue  # pinned for another platform or Python (the lock is universal)
        try:
            installed = importlib.metadata.version(pin.name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{pin.name}: not installed")
            continue
        if installed != pin.version:
            wrong.append(f"{pin.name}: {installed} installed, {pin.version} locked")
    assert not wrong, "the venv is not the lock (run bash scripts/setup.sh --test):\n" + "\n".join(wrong)


def test_a_consistent_lock_passes() -> None:
    assert check_lock.check(PYPROJECT, _locks()) == []


@pytest.mark.parametrize(
    ("pyproject_change", "locks", "expected"),
    [
        # A range moved past the pin (the redis 8.2 case the other way round).
        (("dependencies", ["redis>=5.0.1,<8", "mcp>=2.3,<3"]), _locks(), "redis==8.2.0 does not satisfy"),
        # A new dependency nobody locked.
        (
            ("dependencies", ["redis>=5.0.1,<9", "mcp>=2.3,<3", "pycdlib>=1.14"]),
            _locks(),
            "pycdlib>=1.14 is not pinned",
        ),
        # A new test extra nobody locked: only the test lock must have it.
        (("test", ["pytest>=9,<10", "hypothesis"]), _locks(), "test lock: hypothesis is not pinned"),
        # A pin without its hash: pip's --require-hashes would refuse the whole file.
        (None, _locks(test=TEST.replace(f"pytest==9.2.0 \\\n{H}\n", "pytest==9.2.0\n")), "pytest==9.2.0 has no --hash"),
        # The runtime lock drifting from the test lock: the image would run what the tests never saw.
        (None, _locks(runtime=RUNTIME.replace("mcp==2.3.0", "mcp==2.4.0")), "mcp==2.4.0 is not the version"),
        # A range instead of a pin.
        (None, _locks(test=TEST.replace("redis==8.2.0 \\", "redis>=8 \\")), "is not an exact name==version pin"),
    ],
)
def test_a_broken_lock_is_reported(
    pyproject_change: tuple[str, list[str]] | None, locks: dict[str, str], expected: str
) -> None:
    project = dict(PYPROJECT["project"])
    if pyproject_change is not None:
        key, value = pyproject_change
        if key == "test":
            project["optional-dependencies"] = {"test": value}
        else:
            project[key] = value
    problems = check_lock.check({**PYPROJECT, "project": project}, locks)
    assert any(expected in problem for problem in problems), problems


def test_the_command_fails_with_the_fix(tmp_path: Path) -> None:
    """``python scripts/check_lock.py REPO`` exits 1 and names ``bash scripts/lock`` when the locks are stale."""
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "test.txt").write_text(TEST)
    (tmp_path / "requirements" / "runtime.txt").write_text(RUNTIME)
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\n[project]\nname = "x"\nversion = "0"\n'
        'dependencies = ["redis>=9"]\n'
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_lock.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "redis==8.2.0 does not satisfy pyproject.toml's redis>=9" in proc.stderr
    assert "bash scripts/lock" in proc.stderr
    # ... and 0 once pyproject.toml and the lock agree again.
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\n[project]\nname = "x"\nversion = "0"\n'
        'dependencies = ["redis>=8"]\n'
    )
    ok = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_lock.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
