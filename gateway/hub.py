"""The gateway's process-wide state: open connections, per-user limits, and draining."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from config import Settings
from gateway.auth import Authenticator
from gateway.backends import Backend
from gateway.errors import ErrorCode, GatewayError, RateLimited
from gateway.liveness import TokenBucket
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.connection import Connection

logger = logging.getLogger("gateway.hub")


class UserLimits:
    """Per-user counters and generate-rate buckets for this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: dict[str, int] = {}
        self.generations: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}

    def try_add_connection(self, user: str) -> bool:
        count = self.connections.get(user, 0)
        if count >= self.settings.max_connections_per_user:
            return False
        self.connections[user] = count + 1
        return True

    def remove_connection(self, user: str, now: float) -> None:
        count = self.connections.get(user, 0) - 1
        if count > 0:
            self.connections[user] = count
            return
        self.connections.pop(user, None)
        bucket = self.buckets.get(user)
        if bucket is not None and bucket.full(now):
            del self.buckets[user]

    def acquire_generation(self, user: str, now: float) -> None:
        """Admit one generation for ``user`` or raise ``too_many_streams`` / ``rate_limited``."""
        running = self.generations.get(user, 0)
        if running >= self.settings.max_streams_per_user:
            raise GatewayError(
                f"at most {self.settings.max_streams_per_user} generations per user at once",
                code=ErrorCode.TOO_MANY_STREAMS,
            )
        bucket = self.buckets.get(user)
        if bucket is None:
            bucket = TokenBucket(
                rate_per_s=self.settings.user_generate_rate_per_s, burst=self.settings.user_generate_burst, now=now
            )
            self.buckets[user] = bucket
        wait_s = bucket.try_take(now)
        if wait_s > 0:
            raise RateLimited("too many generate requests", retry_after_s=wait_s)
        self.generations[user] = running + 1

    def release_generation(self, user: str) -> None:
        count = self.generations.get(user, 0) - 1
        if count > 0:
            self.generations[user] = count
        else:
            self.generations.pop(user, None)


class Hub:
    def __init__(self, settings: Settings, backend: Backend, authenticator: Authenticator, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.auth = authenticator
        self.metrics = metrics
        self.limits = UserLimits(settings)
        self.connections: set[Connection] = set()
        self.open_sockets = 0
        self.active_generations = 0
        self.draining = False
        self._no_generations = anyio.Event()
        self._no_generations.set()
        self._no_connections = anyio.Event()
        self._no_connections.set()

    # Bookkeeping used by connections ----------------------------------------------------

    def socket_opened(self) -> None:
        self.open_sockets += 1
        self.metrics.connections.set(self.open_sockets)
        self.metrics.connections_total.inc()
        if self._no_connections.is_set():
            self._no_connections = anyio.Event()

    def socket_closed(self) -> None:
        self.open_sockets -= 1
        self.metrics.connections.set(self.open_sockets)
        if self.open_sockets == 0:
            self._no_connections.set()

    def generation_started(self) -> None:
        self.active_generations += 1
        self.metrics.active_generations.set(self.active_generations)
        if self._no_generations.is_set():
            self._no_generations = anyio.Event()

    def generation_ended(self) -> None:
        self.active_generations -= 1
        self.metrics.active_generations.set(self.active_generations)
        if self.active_generations == 0:
            self._no_generations.set()

    # Shutdown -----------------------------------------------------------------------------

    async def drain(self, force_exit: Callable[[], bool] = lambda: False) -> None:
        """Graceful shutdown: refuse new generations, let running ones finish for up to
        ``drain_timeout_s``, end the rest with ``shutting_down``, close every socket 1001."""
        if self.draining:
            return
        self.draining = True
        self.metrics.draining.set(1)
        logger.info("draining: %d connection(s), %d generation(s) running", self.open_sockets, self.active_generations)
        with anyio.move_on_after(self.settings.drain_timeout_s):
            while not self._no_generations.is_set() and not force_exit():
                with anyio.move_on_after(0.5):
                    await self._no_generations.wait()
        if self.active_generations:
            logger.info("drain timeout: ending %d generation(s) with shutting_down", self.active_generations)
        for connection in list(self.connections):
            connection.shut_down()
        with anyio.move_on_after(5.0):
            await self._no_connections.wait()
        logger.info("drained")
