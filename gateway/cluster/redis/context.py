"""What the Redis parts share: the clients, key naming (versioned, so processes of
another version never read these records), this process's node id and liveness key, and
whether Redis answers (``health``)."""

from __future__ import annotations

import logging
import secrets
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from config import Settings
from gateway.cluster.base import Health
from gateway.wire.errors import Unavailable

logger = logging.getLogger("gateway.redis")

# Part of every key: records written by a process of another layout are never read.
KEY_VERSION = "v2"


class RedisUnavailable(Unavailable, RuntimeError):
    """Redis could not be reached; the message names the URL without its password."""


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if user else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisContext:
    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url
        self.prefix = settings.redis_prefix + KEY_VERSION + ":"
        self.node_id = "n-" + secrets.token_hex(6)
        self.node_ttl_s = settings.node_ttl_s
        self.node_ttl_ms = max(int(settings.node_ttl_s * 1000), 100)
        # Commands wait for a free connection instead of failing when many generations flush
        # at once; blocking stream reads (followers) get a pool of their own so they can
        # never starve the writes.
        self.client: aioredis.Redis = self._client(url, settings.redis_max_connections)
        self.blocking_client: aioredis.Redis = self._client(url, settings.redis_max_connections)
        self.health = Health(up=False)

    @staticmethod
    def _client(url: str, max_connections: int) -> aioredis.Redis:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10, decode_responses=True, socket_connect_timeout=2,
            socket_timeout=15, health_check_interval=5,
        )
        return aioredis.Redis(connection_pool=pool)

    def key(self, *parts: str) -> str:
        # Parts are escaped, so a user "a:b" with id "c" and a user "a" with id "b:c" can
        # never name the same key.
        return self.prefix + ":".join(quote(part, safe="") for part in parts)

    @property
    def node_key(self) -> str:
        return self.key("node", self.node_id)

    async def start(self) -> None:
        try:
            with anyio.fail_after(5):
                await self.client.ping()
                await self.client.set(self.node_key, "1", px=self.node_ttl_ms)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"cannot reach Redis at {redact_url(self.url)}: {type(exc).__name__}") from None
        self.report(True)

    async def aclose(self) -> None:
        try:
            with anyio.move_on_after(2):
                await self.client.delete(self.node_key)
        except (RedisError, OSError):
            pass
        await self.client.aclose()
        await self.blocking_client.aclose()
        await self.client.connection_pool.disconnect()
        await self.blocking_client.connection_pool.disconnect()

    def report(self, up: bool) -> None:
        """Any Redis call's outcome; tracks the degraded state."""
        if up != self.health.up:
            if up:
                logger.info("Redis at %s is reachable", redact_url(self.url))
            else:
                logger.warning("Redis at %s is unreachable; cross-process features wait for it",
                               redact_url(self.url))
            self.health.report(up)

    async def node_alive(self, node: str) -> bool:
        return bool(await self.client.exists(self.key("node", node)))

    async def heartbeat(self) -> None:
        """Keep this node's liveness key alive; other nodes read it to tell a dead producer."""
        interval = max(self.node_ttl_s / 3, 0.2)
        while True:
            try:
                await self.client.set(self.node_key, "1", px=self.node_ttl_ms)
                self.report(True)
            except (RedisError, OSError):
                self.report(False)
            await anyio.sleep(interval)

