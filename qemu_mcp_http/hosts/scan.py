"""A whole vm_dir read by one remote command: the shell script, its argv and the parser of its output.

The parser is pure, and tested from recorded outputs (tests/test_scan.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import HostError
from .base import SCAN_TOTAL_MAX, SMALL_FILE_MAX, SubdirFiles

__all__ = ["ScanChanged", "parse_scan", "scan_argv"]

#: :meth:`SSHHost.scan_subdirs` in one command, with three processes whatever the number of VMs (sh, wc,
#: cat): a fork per file would cost more than the round trips it saves. A constant program: the directory
#: and file names arrive as positional parameters (each quoted by ``shlex.join``), never as program text.
#: Only names a VM may have are scanned, so every path is safe to print on a line; contents are framed by
#: their sizes from ``wc -c``, and the parser checks the total (a file that changed in between: scan again).
#: Symbolic links are reported (``L``), never followed; files over ``max`` bytes, and files past ``maxtotal`` bytes
#: of them all, are reported (``B``), never read (nor is a pid file read before its size is known: ``read`` of a
#: huge file without a newline would take minutes).
_SCAN_SCRIPT = r"""
dir=$1; pidfile=$2; max=$3; maxtotal=$4; shift 4
cd -- "$dir" 2>/dev/null || exit 0
names=$*
set --
for d in *; do
  case $d in [A-Za-z0-9]*) ;; *) continue ;; esac
  case $d in *[!A-Za-z0-9._-]*) continue ;; esac
  if [ -L "$d" ]; then echo "L $d"; continue; fi
  [ -d "$d" ] || continue
  echo "D $d"
  for f in $names; do
    if [ -f "$d/$f" ] && [ ! -L "$d/$f" ] && [ -r "$d/$f" ]; then set -- "$@" "$d/$f"; fi
  done
done
sz=
procs=
total=0
if [ $# -gt 0 ]; then
  # wc -c takes a regular file's size from stat; only /proc files (size 0) are read to count them.
  sizes=$(wc -c -- "$@")
  set --
  while read -r n p; do
    [ "$p" = total ] && continue
    if [ "$n" -gt "$max" ] || [ $((total + n)) -gt "$maxtotal" ]; then echo "B $p"; continue; fi
    total=$((total + n))
    set -- "$@" "$p"
    sz="$sz$n $p
"
    case $p in
      */"$pidfile")
        pid=
        if [ "$n" -lt 32 ]; then read -r pid < "$p" || :; fi
        case $pid in
          ''|*[!0-9]*) ;;
          *) if [ -r "/proc/$pid/cmdline" ]; then echo "P ${p%/*} $pid"; procs="$procs /proc/$pid/cmdline"; fi ;;
        esac ;;
    esac
  done <<SIZES
$sizes
SIZES
fi
if [ -n "$procs" ]; then
  sizes=$(wc -c $procs)
  while read -r n p; do
    [ "$p" = total ] && continue
    set -- "$@" "$p"
    sz="$sz$n $p
"
  done <<SIZES
$sizes
SIZES
fi
echo S
printf %s "$sz"
echo C
if [ $# -gt 0 ]; then cat -- "$@" 2>/dev/null; fi
"""


class ScanChanged(Exception):
    """A file changed between the sizes and the contents of a scan; scanning again settles it."""


def scan_argv(
    directory: str,
    filenames: Sequence[str],
    pidfile: str,
    max_bytes: int = SMALL_FILE_MAX,
    max_total: int = SCAN_TOTAL_MAX,
) -> list[str]:
    """The command of a directory scan; its output is read by :func:`parse_scan`."""
    return ["sh", "-c", _SCAN_SCRIPT, "scan", directory, pidfile, str(max_bytes), str(max_total), *filenames]


def parse_scan(output: bytes, filenames: Sequence[str]) -> dict[str, SubdirFiles]:
    """Decode the output of ``_SCAN_SCRIPT``.

    Lines ``D <name>``, ``L <name>`` (a symbolic link), ``P <name> <pid>`` and ``B <name>/<file>`` (too big
    to read), a line ``S``, the size lines (``<bytes> <path>``), a line ``C``, then the files' contents back
    to back in the order of the size lines. Names and paths cannot hold a newline (the script scans only
    names a VM may have), so only the contents need their sizes.

    :raise ScanChanged: the contents do not add up to the sizes (a file changed in between).
    """
    start = 0 if output.startswith(b"S\n") else output.find(b"\nS\n") + 1  # 0: not found, or at the start
    end = output.find(b"\nC\n", start)
    if not output.startswith(b"S\n", start) or end < 0:
        raise HostError("unreadable answer of the directory scan")
    listing, sizes_text, data = output[:start], output[start + 2 : end + 1], output[end + 3 :]
    found: dict[str, dict[str, bytes | None]] = {}
    links: list[str] = []
    oversized: dict[str, set[str]] = {}
    proc_of: dict[str, str] = {}
    for line in listing.decode().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "D":
            found[rest] = {}
        elif kind == "L":
            links.append(rest)
        elif kind == "B":
            name, _, filename = rest.partition("/")
            oversized.setdefault(name, set()).add(filename)
        elif kind == "P":
            name, _, pid = rest.rpartition(" ")
            proc_of[f"/proc/{pid}/cmdline"] = name
    sizes: list[tuple[str, int]] = []
    for line in sizes_text.decode().splitlines():
        count, _, path = line.strip().partition(" ")
        if "/" in path:  # not wc's "total" line
            sizes.append((path, int(count)))
    if sum(size for _, size in sizes) != len(data):
        raise ScanChanged
    cmdlines: dict[str, bytes] = {}
    offset = 0
    for path, size in sizes:
        content, offset = data[offset : offset + size], offset + size
        if path in proc_of:
            cmdlines[proc_of[path]] = content
        else:
            name, _, filename = path.partition("/")
            found.setdefault(name, {})[filename] = content
    scanned = {
        name: SubdirFiles(
            {f: files.get(f) for f in filenames},
            cmdlines.get(name),
            oversized=frozenset(oversized.get(name, set()) & set(filenames)),
        )
        for name, files in found.items()
    }
    scanned.update({name: SubdirFiles(dict.fromkeys(filenames), None, is_symlink=True) for name in links})
    return scanned
