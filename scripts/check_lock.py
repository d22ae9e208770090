"""Do the dependency locks (requirements/*.txt) still satisfy pyproject.toml?  Exit 1 with the reasons if not.

    python scripts/check_lock.py [REPO]

Checked: every requirement of ``[project].dependencies``, of the ``test`` extra and of ``[build-system].requires``
has a pin in the locks that its specifier accepts; every pin carries at least one hash; the runtime lock pins the
same versions as the test lock.  What a pin itself needs (its dependencies) is checked at install time: pip's
``--require-hashes`` refuses a lock that misses one.  The fix for any failure is ``bash scripts/lock``.

It runs with nothing but the standard library and ``packaging`` (pip's own copy when ``packaging`` is not
installed), so both ``scripts/lock`` and ``scripts/test`` can run it before anything else is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

if importlib.util.find_spec("packaging") is None:
    # A bare interpreter (scripts/lock runs this from uv's venv): pip's vendored copy is the same library.
    _pip = importlib.util.find_spec("pip")
    if _pip is not None and _pip.submodule_search_locations:
        sys.path.insert(0, os.path.join(next(iter(_pip.submodule_search_locations)), "_vendor"))

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = ["LOCKS", "Pin", "check", "main", "parse_lock", "wanted"]

#: The lock files, by what they serve.
LOCKS = {"test": Path("requirements/test.txt"), "runtime": Path("requirements/runtime.txt")}

_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s;\\]+)\s*(?:;(?P<marker>[^\\]*))?"
)


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    marker: str
    hashes: int


def parse_lock(text: str) -> list[Pin]:
    """The pins of a pip requirements file in the form ``uv pip compile --generate-hashes`` writes.

    :raise ValueError: a requirement line that is not an exact ``name==version`` pin.
    """
    pins: list[Pin] = []
    current: dict[str, str] | None = None
    hashes = 0

    def flush() -> None:
        if current is not None:
            pins.append(Pin(current["name"], current["version"], current["marker"], hashes))

    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            if current is None:
                raise ValueError(f"line {number}: a hash without a requirement above it")
            hashes += 1
            continue
        if line.startswith("-"):
            raise ValueError(f"line {number}: option {line.split()[0]!r} has no place in a lock")
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"line {number}: {line!r} is not an exact name==version pin")
        flush()
        current = {
            "name": canonicalize_name(match["name"]),
            "version": match["version"],
            "marker": (match["marker"] or "").strip(),
        }
        hashes = 0
    flush()
    return pins


def wanted(pyproject: Mapping[str, object], extras: Iterable[str] = ()) -> list[Requirement]:
    """The requirements of pyproject.toml: the project's dependencies, the named extras, the build backend.

    :raise ValueError: a requirement that does not parse.
    """
    project = pyproject.get("project")
    build = pyproject.get("build-system")
    if not isinstance(project, dict) or not isinstance(build, dict):
        raise ValueError("pyproject.toml has no [project] or no [build-system] table")
    texts = [*project.get("dependencies", []), *build.get("requires", [])]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        texts += optional.get(extra, [])
    try:
        return [Requirement(text) for text in texts]
    except InvalidRequirement as exc:
        raise ValueError(f"pyproject.toml: {exc}") from exc


def check(pyproject: Mapping[str, object], locks: Mapping[str, str]) -> list[str]:
    """What is wrong with the locks (``{"test": text, "runtime": text}``) for this pyproject; [] when nothing."""
    problems: list[str] = []
    pinned: dict[str, list[Pin]] = {}
    for kind, extras in (("test", ("test",)), ("runtime", ())):
        try:
            pins = parse_lock(locks[kind])
            requirements = wanted(pyproject, extras)
        except ValueError as exc:
            problems.append(f"{kind} lock: {exc}")
            continue
        pinned[kind] = pins
        by_name: dict[str, list[Pin]] = {}
        for pin in pins:
            by_name.setdefault(pin.name, []).append(pin)
            if pin.hashes == 0:
                problems.append(f"{kind} lock: {pin.name}=={pin.version} has no --hash")
        for req in requirements:
            name = canonicalize_name(req.name)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # not for this platform/Python: the universal lock has it under a marker, if anywhere
            candidates = by_name.get(name, [])
            if not candidates:
                problems.append(f"{kind} lock: {req} is not pinned")
            for pin in candidates:
                try:
                    ok = req.specifier.contains(Version(pin.version), prereleases=True)
                except InvalidVersion:
                    ok = False
                if not ok:
                    problems.append(f"{kind} lock: {name}=={pin.version} does not satisfy pyproject.toml's {req}")
    if "test" in pinned and "runtime" in pinned:
        tested = {(pin.name, pin.marker): pin.version for pin in pinned["test"]}
        for pin in pinned["runtime"]:
            if tested.get((pin.name, pin.marker)) != pin.version:
                problems.append(
                    f"runtime lock: {pin.name}=={pin.version} is not the version the test lock pins "
                    f"({tested.get((pin.name, pin.marker), 'none')})"
                )
    return problems


def main(argv: list[str]) -> int:
    repo = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    with (repo / "pyproject.toml").open("rb") as f:
        pyproject = tomllib.load(f)
    locks: dict[str, str] = {}
    for kind, path in LOCKS.items():
        try:
            locks[kind] = (repo / path).read_text()
        except OSError as exc:
            print(f"check_lock: cannot read {path}: {exc.strerror}; run: bash scripts/lock", file=sys.stderr)
            return 1
    problems = check(pyproject, locks)
    for problem in problems:
        print(f"check_lock: {problem}", file=sys.stderr)
    if problems:
        print(
            "check_lock: the locks no longer satisfy pyproject.toml; refresh them: bash scripts/lock", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
