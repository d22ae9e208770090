"""Hosts: where VMs live (the local machine, or a remote one over pooled SSH)."""

from .base import CommandResult, FileStat, Host
from .local import LocalHost
from .pool import PoolLimits, PoolStats, SSHPool, SSHTarget
from .ssh import SSHHost

__all__ = [
    "CommandResult",
    "FileStat",
    "Host",
    "LocalHost",
    "PoolLimits",
    "PoolStats",
    "SSHHost",
    "SSHPool",
    "SSHTarget",
]
