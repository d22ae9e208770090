"""Where and as whom to connect over SSH, and the pool's limits: small frozen values, validated once."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field

from ..config import Settings

__all__ = ["PoolLimits", "SSHTarget"]

#: Per-process secret: a password's identity in the pool is an HMAC, never the password or a plain hash.
_IDENTITY_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class SSHTarget:
    """Where and as whom to connect; ``repr`` never shows the password.

    The key wins when both ``key_path`` and ``password`` are given: only the key is offered.
    """

    host: str
    port: int
    user: str
    password: str | None = field(default=None, repr=False)
    key_path: str | None = None
    #: The name clients use (a named host's name); the address otherwise.
    name: str = ""
    #: known_hosts of this target (a named host's own); the pool's setting otherwise.
    known_hosts: str | None = None

    @property
    def display(self) -> str:
        return self.name or self.host

    @property
    def label(self) -> str:
        """``user@host:port``, for messages and logs."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def account(self) -> str:
        """The remote account, whatever credential reached it (QMP sessions are shared per account)."""
        return f"ssh://{self.label}"

    @property
    def credential_id(self) -> str:
        if self.key_path:
            return "key:" + os.path.realpath(os.path.expanduser(self.key_path))
        digest = hmac.new(_IDENTITY_KEY, (self.password or "").encode(), hashlib.sha256).hexdigest()[:16]
        return "pwd:" + digest

    @property
    def pool_key(self) -> tuple[str, int, str, str, str]:
        return (self.host, self.port, self.user, self.credential_id, self.known_hosts or "")


@dataclass(frozen=True)
class PoolLimits:
    """The pool's settings, validated once with :class:`Settings`."""

    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    keepalive_interval: float = 15.0
    max_connections_per_host: int = 4
    max_channels_per_connection: int = 8
    known_hosts: str = "~/.ssh/known_hosts"
    host_key_policy: str = "strict"

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolLimits:
        return cls(
            connect_timeout=settings.ssh_connect_timeout,
            idle_timeout=settings.ssh_idle_timeout,
            keepalive_interval=settings.ssh_keepalive_interval,
            max_connections_per_host=settings.ssh_max_connections_per_host,
            max_channels_per_connection=settings.ssh_max_channels_per_connection,
            known_hosts=settings.ssh_known_hosts,
            host_key_policy=settings.ssh_host_key_policy,
        )

    @property
    def exec_slots(self) -> int:
        """Exec channels per connection: the SFTP session holds one of the channel budget."""
        return max(1, self.max_channels_per_connection - 1)
