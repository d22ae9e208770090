"""The resource-change bus shared by replicas: the SDK's ``SubscriptionBus`` over Redis pub/sub.

``publish`` sends an event to the Redis channel only; :meth:`RedisSubscriptionBus.run` (a task of the server's
lifespan) feeds every message of the channel, this replica's own included, to the local listeners (the SDK's
listen streams and :class:`~qemu_mcp_http.fleet.changes.ChangeFeed`'s 2025 sessions). Publishing locally as well
would deliver twice. Redis pub/sub keeps nothing: a replica that was away misses what was published meanwhile,
as a client whose listen stream dropped does (it lists again).

A lost Redis connection is retried with a backoff; events published while it is down are logged and dropped
(publish never fails a tool call: the change itself happened).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)
from redis.exceptions import RedisError

from .changes import HostListChanged

__all__ = ["CHANNEL", "RedisSubscriptionBus", "decode_event", "encode_event"]

log = logging.getLogger(__name__)

CHANNEL = "qemu-mcp-http:events"
#: Every Redis command (connect, publish) is bounded.
REDIS_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 8192


def encode_event(event: ServerEvent) -> str:
    if isinstance(event, ResourceUpdated):
        return json.dumps({"kind": "resource_updated", "uri": event.uri}, separators=(",", ":"))
    if isinstance(event, HostListChanged):
        return json.dumps({"kind": "resources_list_changed", "host": event.host}, separators=(",", ":"))
    kinds = {ResourcesListChanged: "resources_list_changed", ToolsListChanged: "tools_list_changed",
             PromptsListChanged: "prompts_list_changed"}  # fmt: skip
    return json.dumps({"kind": kinds[type(event)]}, separators=(",", ":"))


def decode_event(raw: bytes | str) -> ServerEvent | None:
    """An event from the channel; ``None`` for anything else (the channel is not trusted to be ours alone)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return None
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(message, dict):
        return None
    kind = message.get("kind")
    if kind == "resource_updated" and isinstance(message.get("uri"), str):
        return ResourceUpdated(uri=message["uri"])
    if kind == "resources_list_changed" and isinstance(message.get("host"), str):
        return HostListChanged(host=message["host"])  # heard only by tokens that reach it (changes.visible)
    simple: dict[str, ServerEvent] = {
        "resources_list_changed": ResourcesListChanged(),
        "tools_list_changed": ToolsListChanged(),
        "prompts_list_changed": PromptsListChanged(),
    }
    return simple.get(str(kind))


class RedisSubscriptionBus:
    """A ``SubscriptionBus`` whose events go through one Redis channel to every replica."""

    def __init__(self, url: str, channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self._local = InMemorySubscriptionBus()
        self._redis = aioredis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        # The subscriber waits for messages as long as there are none: no read timeout, but keepalive and a
        # periodic PING (health check) so that a dead connection is noticed and replaced.
        self._listener = aioredis.from_url(
            url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_keepalive=True, health_check_interval=15
        )
        self.connected = asyncio.Event()
        self.published = 0
        self.received = 0

    async def publish(self, event: ServerEvent) -> None:
        try:
            await self._redis.publish(self.channel, encode_event(event))
            self.published += 1
        except (RedisError, OSError) as exc:
            log.warning("resource event not shared (Redis at %s: %s)", _safe(self.url), exc)

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        return self._local.subscribe(listener)

    async def run(self) -> None:
        """Feed the channel's messages to the local listeners, reconnecting until cancelled."""
        delay = 0.5
        while True:
            pubsub = self._listener.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.connected.set()
                delay = 0.5
                log.info("sharing resource events through Redis at %s", _safe(self.url))
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    event = decode_event(message.get("data", b""))
                    if event is not None:
                        self.received += 1
                        await self._local.publish(event)
            except (RedisError, OSError) as exc:
                self.connected.clear()
                log.warning("Redis at %s: %s; retrying in %g s", _safe(self.url), exc, delay)
            finally:
                # Through a typed name: redis < 8.2 leaves PubSub.aclose unannotated, 8.2 annotates it, and
                # mypy --strict must pass with every version the dependency range allows.
                close_pubsub: Callable[[], Awaitable[None]] = pubsub.aclose
                await asyncio.shield(close_pubsub())
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._listener.aclose()


def _safe(url: str) -> str:
    """The URL without a password (redis://:secret@host)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"
