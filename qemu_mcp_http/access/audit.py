"""The audit trail: one JSON line per state-changing action, to the logger ``qemu_mcp_http.audit`` and to
``--audit-log`` when it is set (console input and guest commands by their length or command line, never what is
typed or written)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from ..config import Settings

__all__ = ["audit"]

#: A name of its own (not this module's): operators route and keep the audit lines by it.
audit_log = logging.getLogger("qemu_mcp_http.audit")


def audit(settings: Settings, **fields_: Any) -> None:
    """One line per state-changing action: time, client, host, VM, action, result.

    Synchronous on purpose: it runs in ``finally`` blocks of cancelled calls, where an ``await`` would be
    cancelled again; the file append is one small ``O_APPEND`` write.
    """
    record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **fields_}
    line = json.dumps(record, separators=(",", ":"), default=str)
    audit_log.info("%s", line)
    if settings.audit_log:
        try:
            _append(settings.audit_log, line + "\n")
        except OSError as exc:
            audit_log.error("cannot append to the audit log %s: %s", settings.audit_log, exc.strerror)


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
