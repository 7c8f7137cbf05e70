"""Per-user limits for one process."""

from __future__ import annotations

import anyio

from config import Settings
from gateway.limits.base import Lease
from gateway.liveness import TokenBucket
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import GatewayError, RateLimited


def too_many_streams(limit: int) -> GatewayError:
    return GatewayError(f"at most {limit} generations per user at once", code=ErrorCode.TOO_MANY_STREAMS)


class MemoryLimitStore:
    name = "memory"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: dict[str, int] = {}
        self.generations: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}

    async def add_connection(self, user: str) -> Lease | None:
        return self.add_connection_now(user)

    def add_connection_now(self, user: str) -> Lease | None:
        count = self.connections.get(user, 0)
        if count >= self.settings.max_connections_per_user:
            return None
        self.connections[user] = count + 1

        async def release() -> None:
            self._remove_connection(user)

        return Lease(release)

    def _remove_connection(self, user: str) -> None:
        count = self.connections.get(user, 0) - 1
        if count > 0:
            self.connections[user] = count
            return
        self.connections.pop(user, None)
        bucket = self.buckets.get(user)
        if bucket is not None and bucket.full(anyio.current_time()):
            del self.buckets[user]

    async def acquire_generation(self, user: str) -> Lease:
        return self.acquire_generation_now(user)

    def acquire_generation_now(self, user: str) -> Lease:
        now = anyio.current_time()
        running = self.generations.get(user, 0)
        if running >= self.settings.max_streams_per_user:
            raise too_many_streams(self.settings.max_streams_per_user)
        bucket = self.buckets.get(user)
        if bucket is None:
            bucket = TokenBucket(rate_per_s=self.settings.user_generate_rate_per_s,
                                 burst=self.settings.user_generate_burst, now=now)
            self.buckets[user] = bucket
        wait_s = bucket.try_take(now)
        if wait_s > 0:
            raise RateLimited("too many generate requests", retry_after_s=wait_s)
        self.generations[user] = running + 1

        async def release() -> None:
            count = self.generations.get(user, 0) - 1
            if count > 0:
                self.generations[user] = count
            else:
                self.generations.pop(user, None)

        return Lease(release)
