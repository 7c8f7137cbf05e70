"""What the Redis parts share: the clients (one Redis, or a Redis Cluster with
``GATEWAY_REDIS_CLUSTER``), key and channel naming (versioned, so processes of another
layout never read these records), this process's node id and liveness key, and whether
Redis answers (``health``).

Every key that belongs to a user carries the user as its hash tag (``<prefix>v3:{<user>}:…``),
so every script, pipeline step and read that touches several keys of one user stays in one
slot of a Redis Cluster. Single Redis and Cluster share this layout and every command."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeAlias
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError, ResponseError

from config import Settings
from gateway.cluster.base import Health
from gateway.wire.errors import Unavailable

logger = logging.getLogger("gateway.redis")

# Part of every key: records written by a process of another layout are never read.
# v3: keys of a user carry the user as their hash tag; sharded channels split by purpose.
KEY_VERSION = "v3"
# How long closing a client may take when a loop that owns one stops.
CLOSE_TIMEOUT_S = 2.0
# How long an answer of ``node_alive`` is reused.
ALIVE_CACHE_S = 0.5


# A client of one Redis or of a Redis Cluster: the gateway uses the commands both have, each
# on keys of one slot (redis-py types them as two classes with no common base).
Client: TypeAlias = Any


def is_pool_exhausted(exc: BaseException) -> bool:
    """The pool had no free connection within ``GATEWAY_REDIS_POOL_TIMEOUT_S`` (redis-py raises a
    ConnectionError caused by a timeout; the cluster client, which does not wait, a
    MaxConnectionsError): the process is busy, Redis may be fine."""
    if isinstance(exc, MaxConnectionsError):
        return True
    return isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, TimeoutError)


def slot_of(key: str) -> int:
    """The key's Redis Cluster hash slot (the same on single Redis, where it only groups)."""
    return int(key_slot(key.encode()))


def node_url(url: str, host: str, port: int) -> str:
    """``url`` (scheme, credentials, options) pointed at another node of its cluster."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{address}" if userinfo else address
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _Permits:
    """At most ``count`` commands or pipelines in flight; a caller waits up to
    ``timeout_s`` for its turn, then gets MaxConnectionsError (the pool is exhausted)."""

    def __init__(self, count: int, timeout_s: float) -> None:
        self.count = count
        self.timeout_s = timeout_s
        self._semaphore: asyncio.Semaphore | None = None

    async def run(self, call: Coroutine[Any, Any, Any]) -> Any:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.count)
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.timeout_s)
        except BaseException as exc:
            call.close()  # never started
            if isinstance(exc, TimeoutError):
                raise MaxConnectionsError("no free Redis connection") from None
            raise
        try:
            return await call
        finally:
            self._semaphore.release()


# What redis-py's cluster client lets through when a node's connection broke under it: a
# write to a transport the server closed (uvloop raises RuntimeError, where the standard
# loop ignores the write and the read fails as a connection error), or to a connection
# another task disconnected meanwhile (AttributeError on its writer, now None).
_BROKEN_CONNECTION = (RuntimeError, AttributeError)


class _WaitingPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, WaitingRedisCluster)
        try:
            result: list[Any] = await client.permits.run(super().execute(raise_on_error, allow_redirections))
        except _BROKEN_CONNECTION as exc:
            await client.broken_connection(exc)
        return result


class WaitingRedisCluster(AsyncRedisCluster):
    """The cluster client, whose callers wait for a free connection as the single-Redis
    client's do: redis-py's cluster client raises at once when a node's pool is full. A
    command or pipeline takes one permit of ``max_connections`` and at most one connection
    per node, so no node's pool runs out."""

    permits: _Permits

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.permits.run(super().execute_command(*args, **kwargs))
        except _BROKEN_CONNECTION as exc:
            await self.broken_connection(exc)

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # XREAD's keys follow STREAMS: read here, instead of asking a node (COMMAND GETKEYS)
        # before every read, as redis-py does for commands whose keys move.
        if command.upper() == "XREAD":
            words = [(arg.decode() if isinstance(arg, bytes) else str(arg)).upper() for arg in args]
            if "STREAMS" in words:
                rest = args[words.index("STREAMS") + 1:]
                slots = {self.keyslot(key) for key in rest[:len(rest) // 2]}
                if len(slots) == 1:
                    return slots.pop()
        slot: int = await super()._determine_slot(command, *args)
        return slot

    async def broken_connection(self, exc: Exception) -> NoReturn:
        """A call failed on a broken connection (a node restarted) outside redis-py's
        connection-error handling: every node's connections are made again, as redis-py
        does after a connection error, and the caller gets a connection error."""
        for node in self.get_nodes():
            node.update_active_connections_for_reconnect()
            await node.disconnect_free_connections()
        raise RedisConnectionError("the connection was closed by the server") from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py makes its own


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
        self.cluster_mode = settings.redis_cluster
        # Commands wait for a free connection instead of failing when many callers need one
        # at once (on a cluster: for one of as many turns, each taking at most one connection
        # per node, since redis-py's cluster client does not wait). The followers' tailing
        # reads, the subscriptions and the liveness heartbeat have connections of their own
        # (``dedicated_client``, ``node_client``), so they can neither starve the commands
        # nor be starved by them.
        self.client: Client = self._client(settings.redis_max_connections, settings.redis_pool_timeout_s)
        self.health = Health(up=False)
        self._alive_cache: dict[str, tuple[float, bool]] = {}
        self._pool_warned_at = -float("inf")

    def _client(self, max_connections: int, pool_timeout_s: float) -> Client:
        if self.cluster_mode:
            client = WaitingRedisCluster.from_url(
                self.url, max_connections=max_connections, decode_responses=True,
                socket_connect_timeout=2, socket_timeout=15, health_check_interval=5,
            )
            assert isinstance(client, WaitingRedisCluster)
            client.permits = _Permits(max_connections, pool_timeout_s)
            return client
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=max_connections, timeout=pool_timeout_s, decode_responses=True,
            socket_connect_timeout=2, socket_timeout=15, health_check_interval=5,
        )
        return aioredis.Redis(connection_pool=pool)

    def dedicated_client(self, socket_timeout: float | None = 15.0) -> Client:
        """A client of its own, outside the command pool: one connection on single Redis,
        at most two per node of a cluster."""
        if self.cluster_mode:
            client = WaitingRedisCluster.from_url(
                self.url, max_connections=2, decode_responses=True, socket_connect_timeout=2,
                socket_timeout=socket_timeout, health_check_interval=5,
            )
            assert isinstance(client, WaitingRedisCluster)
            client.permits = _Permits(2, socket_timeout or 15.0)
            return client
        return aioredis.Redis.from_url(
            self.url, single_connection_client=True, decode_responses=True, socket_connect_timeout=2,
            socket_timeout=socket_timeout, health_check_interval=5,
        )

    def node_client(self, url: str) -> aioredis.Redis:
        """A plain client of one server (a cluster node, or the single Redis), for a sharded
        subscription, which lives on the node that owns its channel's slot."""
        client: aioredis.Redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, socket_timeout=None,
            health_check_interval=5, max_connections=2,
        )
        return client

    async def channel_node_url(self, channel: str) -> str:
        """The URL of the server that owns ``channel``'s slot."""
        if not self.cluster_mode:
            return self.url
        node = self.client.nodes_manager.get_node_from_slot(slot_of(channel))
        return node_url(self.url, node.host, int(node.port))

    async def refresh_topology(self) -> None:
        """Ask the cluster again which node owns which slot (after a subscription was moved)."""
        if self.cluster_mode:
            await self.client.nodes_manager.initialize()

    def key(self, *parts: str) -> str:
        # Parts are escaped, so a user "a:b" with id "c" and a user "a" with id "b:c" can
        # never name the same key.
        return self.prefix + ":".join(quote(part, safe="") for part in parts)

    def user_key(self, user: str, *parts: str) -> str:
        """A key of ``user``'s, hash-tagged by the user: every key of one user is in one
        cluster slot. The user is escaped like every part (``{`` and ``}`` included), so no
        name can end the tag early; an empty name gets ``%``, which escaping never yields
        alone (an empty tag would hash the whole key)."""
        return self.prefix + "{" + (quote(user, safe="") or "%") + "}:" + ":".join(
            quote(part, safe="") for part in parts)

    def channel(self, purpose: str, name: str = "") -> str:
        """A sharded pub/sub channel: ``ctl:node:<id>``, ``ctl:room:<room>``, ``ctl:bcast``."""
        return self.key("ctl", purpose, name) if name else self.key("ctl", purpose)

    @property
    def node_key(self) -> str:
        return self.key("node", self.node_id)

    async def start(self) -> None:
        try:
            with anyio.fail_after(5):
                await self.client.ping()
                await self.client.set(self.node_key, "1", px=self.node_ttl_ms)
                try:
                    await self.client.spublish(self.channel("probe"), "")
                except ResponseError:
                    # Redis before 7 has no sharded pub/sub, which the backplane uses.
                    raise RedisUnavailable(f"Redis at {redact_url(self.url)} has no SPUBLISH: the gateway "
                                           "needs Redis 7 or newer") from None
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
        if not self.cluster_mode:
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

