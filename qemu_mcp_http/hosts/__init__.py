"""Hosts: where VMs live (the local machine, or a remote one over pooled SSH).

Operations get a :class:`Host` and never know which kind they have.
"""

from .base import CommandResult, FileLock, FileStat, Host, SubdirFiles
from .local import LocalHost
from .pool import PoolLimits, PoolStats, SSHPool, SSHTarget
from .scan import parse_scan, scan_argv
from .ssh import SSHHost

__all__ = [
    "Host",
    "LocalHost",
    "SSHHost",
    "SSHPool",
    "SSHTarget",
    "PoolLimits",
    "PoolStats",
    "CommandResult",
    "FileLock",
    "FileStat",
    "SubdirFiles",
    "parse_scan",
    "scan_argv",
]
