"""How many ``monitor_vm_status`` streams run, per client and in all, and the limits on them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import LimitExceeded

__all__ = ["StreamLimiter"]


@dataclass
class StreamLimiter:
    """Counts concurrent monitor streams per client; limits come from settings at each call."""

    _active: dict[str, int] = field(default_factory=dict)

    @property
    def running(self) -> int:
        """Streams running now, all clients together."""
        return sum(self._active.values())

    @contextlib.contextmanager
    def slot(self, client: str, per_client: int, total: int) -> Iterator[None]:
        mine = self._active.get(client, 0)
        if mine >= per_client:
            raise LimitExceeded(
                f"client {client} already runs {mine} monitor_vm_status streams (limit {per_client}); "
                "cancel one or wait for it to finish"
            )
        if sum(self._active.values()) >= total:
            raise LimitExceeded(f"the server already runs {total} monitor streams (its limit); try again later")
        self._active[client] = mine + 1
        try:
            yield
        finally:
            self._active[client] -= 1
            if not self._active[client]:
                del self._active[client]
