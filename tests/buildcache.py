"""The cache of test artefacts built from Debian packages (the busybox guest ISOs, the Debian cloud image).

Each artefact lives in ``$<ENV>`` or ``~/.cache/qemu-mcp-http/<name>``, in a directory named by the hash of its
build inputs, so editing a build rebuilds it and an unchanged one costs nothing. An exclusive ``flock`` on that
directory serializes builds of parallel runs; builds of other versions unused for a week are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["STALE_AFTER_S", "build_directory", "inputs_hash", "link_or_copy", "locked", "prune_stale"]

#: Cached builds of other versions unused for this long are removed.
STALE_AFTER_S = 7 * 86400


def inputs_hash(src: Path) -> str:
    """Hash of every file of ``src`` (names and contents): the cache key."""
    digest = hashlib.sha256()
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_directory(env_var: str, name: str, src: Path, cache: Path | None = None) -> Path:
    """Where the build of ``src``'s current inputs lives (created)."""
    if cache is None:
        configured = os.environ.get(env_var)
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qemu-mcp-http" / name
        cache = Path(configured) if configured else base
    directory = cache / inputs_hash(src)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the build directory's lock; on the way out, mark it used (not stale)."""
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield
        os.utime(directory)


def prune_stale(current: Path, removable: Callable[[Path], bool] = lambda _: True) -> None:
    """Remove builds of other versions unused for a week, unless a run holds their lock."""
    for other in current.parent.iterdir():
        if other == current or not other.is_dir() or time.time() - other.stat().st_mtime < STALE_AFTER_S:
            continue
        try:
            with open(other / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if removable(other):
                    shutil.rmtree(other)
        except OSError:
            continue


def link_or_copy(source: Path, target: Path) -> Path:
    """``source`` at ``target``: a hard link when on the same filesystem, else a copy (the server resolves
    symlinks before its root check, so a symlink would point outside its roots)."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            part = target.with_suffix(".part")
            shutil.copyfile(source, part)
            part.rename(target)
    return target
