"""The command line: serve with uvicorn, or ``--check`` this machine."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from types import FrameType

import uvicorn

from .app import build_app
from .check import run_checks
from .config import is_loopback, parse_invocation
from .observability import configure_logging

__all__ = ["main"]

#: Seconds an idle HTTP connection stays open on the server's side.
KEEP_ALIVE_S = 75

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve; or, with ``--check``, report whether the server can run here (exit 0 usable, 1 not)."""
    invocation = parse_invocation(argv)  # --help, --version and malformed flags exit here
    if invocation.check:
        configure_logging("ERROR", "text")  # the report says it all; the probe's own lines would repeat it
        return run_checks(invocation, sys.stdout)
    try:
        settings = invocation.settings()
        app = build_app(settings)
    except ValueError as exc:
        print(f"qemu-mcp-http: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if not is_loopback(settings.host) and not (settings.token or settings.token_file):
        log.warning(
            "serving %s WITHOUT authentication (--allow-unauthenticated): anyone who can connect controls VMs",
            settings.host,
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
        # Longer than the clients' and the load balancer's own idle timeouts (httpx: 5 s, deploy/haproxy.cfg:
        # 30 s): with uvicorn's 5 s default, a client reusing a connection just as the server closed it lost its
        # request ("Server disconnected without sending a response").
        timeout_keep_alive=KEEP_ALIVE_S,
        log_config=None,  # one format for all loggers, set above
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it has handled gracefully
        _Server(config, on_exit=app.state.shutdown.trigger).run()
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, telling open-ended calls at SIGTERM/SIGINT, so they need not hold the graceful window."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
