"""The cluster on Redis (``redis://`` or ``rediss://``, one server or a Redis Cluster with
``GATEWAY_REDIS_CLUSTER``): any number of processes and hosts act as one. Imported only
for those schemes, so redis-py stays an optional dependency."""

from __future__ import annotations

from config import Settings
from gateway.cluster.base import SpawnLoop
from gateway.cluster.redis.backplane import RedisBackplane
from gateway.cluster.redis.context import RedisContext
from gateway.cluster.redis.limits import RedisLimitStore
from gateway.cluster.redis.store import RedisStreamStore


class RedisCluster:
    name = "redis"
    shared = True

    def __init__(self, settings: Settings, url: str) -> None:
        self.context = RedisContext(settings, url)
        self.node_id = self.context.node_id
        self.health = self.context.health
        self.store = RedisStreamStore(settings, self.context)
        self.limits = RedisLimitStore(settings, self.context)
        self.backplane = RedisBackplane(self.context)
        self.backplane.on_follow = self.store.followed_from
        self.backplane.on_written = self.store.tailer.written

    async def start(self, spawn: SpawnLoop) -> None:
        await self.context.start()
        spawn("redis heartbeat", self.context.heartbeat)
        spawn("backplane listener", self.backplane.run)
        spawn("stream tailer", self.store.tailer.run)
        spawn("limits refresh", self.limits.refresh)

    async def aclose(self) -> None:
        await self.context.aclose()


def build(settings: Settings, url: str) -> RedisCluster:
    return RedisCluster(settings, url)
