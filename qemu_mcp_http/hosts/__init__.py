"""Hosts: where VMs live (the local machine, or a remote one over pooled SSH)."""

from .base import CommandResult, FileStat, Host
from .local import LocalHost

__all__ = ["CommandResult", "FileStat", "Host", "LocalHost"]
