"""Counters of the SSH pool's network work (``/healthz``, ``/metrics``, the benchmark)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PoolStats"]


@dataclass
class PoolStats:
    """Counters of the pool's network work (for ``/healthz`` and the benchmark).

    ``round_trips`` counts the sequential waits on the network a caller pays: a channel open,
    an exec request, the wait for a command's exit, one stage of pipelined SFTP requests.
    """

    connections_opened: int = 0
    connections_closed: int = 0
    #: Tool calls that found a live connection to their target (no handshake paid).
    connections_reused: int = 0
    connect_failures: int = 0
    channels_opened: int = 0
    exec_requests: int = 0
    sftp_requests: int = 0
    streamlocal_opens: int = 0
    round_trips: int = 0
    retries: int = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)

    def count(self, **increments: int) -> None:
        """Add to several counters at once: ``stats.count(channels_opened=1, round_trips=3)``."""
        for name, n in increments.items():
            setattr(self, name, getattr(self, name) + n)
