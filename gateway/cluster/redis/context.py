"""What the Redis parts share: the clients, key naming (versioned, so processes of
another version never read these records), this process's node id and liveness key, and
whether Redis answers (``health``)."""

from __future__ import annotations

import logging
import secrets
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from config import Settings
from gateway.cluster.base import Health
from gateway.wire.errors import Unavailable

logger = logging.getLogger("gateway.redis")

# Part of every key: records written by a process of another layout are never read.
KEY_VERSION = "v2"
# How long closing a client may take when a loop that owns one stops.
CLOSE_TIMEOUT_S = 2.0
# How long an answer of ``node_alive`` is reused.
ALIVE_CACHE_S = 0.5


def is_pool_exhausted(exc: BaseException) -> bool:
    """The pool had no free connection within ``GATEWAY_REDIS_POOL_TIMEOUT_S`` (redis-py raises a
    ConnectionError caused by a timeout): the process is busy, Redis may be fine."""
    return isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, TimeoutError)


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
        # Commands wait for a free connection instead of failing when many callers need one
        # at once. Reads that block (the followers' tail) and the liveness heartbeat have
        # connections of their own (``dedicated_client``), so they can neither starve the
        # commands nor be starved by them.
        self.client: aioredis.Redis = self._client(url, settings.redis_max_connections, settings.redis_pool_timeout_s)
        self.health = Health(up=False)
        self._alive_cache: dict[str, tuple[float, bool]] = {}
        self._pool_warned_at = -float("inf")

    @staticmethod
    def _client(url: str, max_connections: int, pool_timeout_s: float) -> aioredis.Redis:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout_s, decode_responses=True,
            socket_connect_timeout=2, socket_timeout=15, health_check_interval=5,
        )
        return aioredis.Redis(connection_pool=pool)

    def dedicated_client(self, socket_timeout: float | None = 15.0, *, single: bool = True) -> aioredis.Redis:
        """A client of its own, outside the command pool: on one connection (``single``),
        or with a small pool of its own (a pub/sub subscription takes a connection)."""
        client: aioredis.Redis = aioredis.Redis.from_url(
            self.url, single_connection_client=single, decode_responses=True, socket_connect_timeout=2,
            socket_timeout=socket_timeout, health_check_interval=5, max_connections=2,
        )
        return client

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
        await self.client.connection_pool.disconnect()

    def report_error(self, exc: BaseException) -> None:
        """A Redis call failed. Waiting too long for a free pooled connection means this
        process is busy, not that Redis is down: that is logged, not reported."""
        if is_pool_exhausted(exc):
            now = anyio.current_time()
            if now - self._pool_warned_at < 10:
                return
            self._pool_warned_at = now
            logger.warning("no free Redis connection within %gs (GATEWAY_REDIS_MAX_CONNECTIONS=%d)",
                           self.settings.redis_pool_timeout_s, self.settings.redis_max_connections)
            return
        self.report(False)

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
        """Whether ``node``'s liveness key exists. Answers are shared for a moment, so that
        many idle followers of one producer cost one read."""
        now = anyio.current_time()
        cached = self._alive_cache.get(node)
        if cached is not None and now - cached[0] < ALIVE_CACHE_S:
            return cached[1]
        alive = bool(await self.client.exists(self.key("node", node)))
        if len(self._alive_cache) > 1024:
            self._alive_cache.clear()
        self._alive_cache[node] = (now, alive)
        return alive

    async def heartbeat(self) -> None:
        """Keep this node's liveness key alive; other nodes read it to tell a dead producer."""
        interval = max(self.node_ttl_s / 3, 0.2)
        client = self.dedicated_client(socket_timeout=max(interval, 1.0))
        try:
            while True:
                try:
                    await client.set(self.node_key, "1", px=self.node_ttl_ms)
                    self.report(True)
                except (RedisError, OSError):
                    self.report(False)
                await anyio.sleep(interval)
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await client.aclose()

