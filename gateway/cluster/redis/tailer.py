"""One blocking read per process for every stored stream followed here.

A client resuming a generation that runs on another process reads the generation's Redis
Stream: first what is stored (plain reads, see ``RedisStreamStore.follow``), then the live
tail. The tail of every such follower of this process comes from the one ``XREAD BLOCK``
that ``StreamTailer.run`` keeps open on a connection of its own, with every followed key
in it. So 500 followers cost one connection and one command per batch of new entries, not
500 connections each blocked in a read, and they cannot exhaust the command pool.

A subscription holds what the tailer read for it until its follower takes it, and is left
out of the next read until then: a slow follower holds at most one read's worth
(``TAIL_COUNT`` entries) and slows no other. When the set of keys changes while the read
is blocked, ``CLIENT UNBLOCK`` ends it so the next read includes the new key at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.cluster.redis.context import CLOSE_TIMEOUT_S, RedisContext
from gateway.cluster.redis.wakeup import Wakeup

logger = logging.getLogger("gateway.redis")

# Entries per key per read, and the longest one blocking read waits.
TAIL_COUNT = 512
TAIL_BLOCK_MS = 1000

Entry = tuple[str, dict[str, str]]


def entry_order(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


class Subscription:
    """One follower's place in one stream: entries after ``last_id`` not yet taken."""

    __slots__ = ("_arrived", "entries", "key", "last_id")

    def __init__(self, key: str, last_id: str) -> None:
        self.key = key
        self.last_id = last_id
        self.entries: deque[Entry] = deque()
        self._arrived = Wakeup()

    def _deliver(self, entries: list[Entry]) -> None:
        after = entry_order(self.last_id)
        fresh = [entry for entry in entries if entry_order(entry[0]) > after]
        if not fresh:
            return
        self.entries.extend(fresh)
        self.last_id = fresh[-1][0]
        self._arrived.wake()

    async def take(self, timeout_s: float) -> list[Entry]:
        """What arrived since the last take; waits up to ``timeout_s`` for something, and
        returns an empty list when nothing came."""
        if not self.entries:
            await self._arrived.wait(timeout_s)
        taken = list(self.entries)
        self.entries.clear()
        return taken


class StreamTailer:
    def __init__(self, context: RedisContext) -> None:
        self.ctx = context
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._changed = Wakeup()
        self._blocked_id: int | None = None  # the reading connection's id while it blocks
        self._unblock_wanted = Wakeup()
        # Reads made, for tests and benchmarks.
        self.reads = 0

    @property
    def followed(self) -> int:
        return sum(len(subscriptions) for subscriptions in self._subscriptions.values())

    def subscribe(self, key: str, last_id: str) -> Subscription:
        subscription = Subscription(key, last_id)
        self._subscriptions.setdefault(key, []).append(subscription)
        self._poke()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self._subscriptions.get(subscription.key)
        if subscriptions is None:
            return
        if subscription in subscriptions:
            subscriptions.remove(subscription)
        if not subscriptions:
            del self._subscriptions[subscription.key]

    def taken(self, subscription: Subscription) -> None:
        """The follower took its entries: read its key again."""
        if not subscription.entries:
            self._poke()

    def _poke(self) -> None:
        self._changed.wake()
        if self._blocked_id is not None:
            self._unblock_wanted.wake()

    async def _unblocker(self) -> None:
        """Ends the blocked read when the keys change (``CLIENT UNBLOCK`` from the command
        pool), at most one at a time; a read that was not blocked yet ends on its own
        within TAIL_BLOCK_MS."""
        while True:
            await self._unblock_wanted.wait()
            client_id = self._blocked_id
            if client_id is None:
                continue
            with contextlib.suppress(RedisError, OSError):
                await self.ctx.client.client_unblock(client_id)

    def _wanted(self) -> dict[Any, Any]:
        """Each followed key, from the earliest position of its followers that have taken
        everything read for them so far."""
        wanted: dict[Any, Any] = {}
        for key, subscriptions in self._subscriptions.items():
            ready = [s.last_id for s in subscriptions if not s.entries]
            if ready:
                wanted[key] = min(ready, key=entry_order)
        return wanted

    async def run(self) -> None:
        """Read for every subscription until cancelled. Redis errors are waited out here;
        the subscriptions keep their places."""
        connection: aioredis.Redis = self.ctx.dedicated_client(socket_timeout=TAIL_BLOCK_MS / 1000 + 10)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._unblocker)
                await self._read(connection)
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await connection.aclose()

    async def _read(self, connection: aioredis.Redis) -> None:
        backoff = 0.1
        client_id: int | None = None
        while True:
            wanted = self._wanted()
            if not wanted:
                await self._changed.wait()
                continue
            try:
                if client_id is None:
                    client_id = int(await connection.client_id())
                self._blocked_id = client_id
                try:
                    response: Any = await connection.xread(wanted, count=TAIL_COUNT, block=TAIL_BLOCK_MS)
                finally:
                    self._blocked_id = None
                self.ctx.report(True)
                backoff = 0.1
            except (RedisError, OSError) as exc:
                client_id = None  # a new connection has a new id
                self.ctx.report_error(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self.reads += 1
            for key, entries in response or ():
                for subscription in self._subscriptions.get(key, ()):
                    if not subscription.entries:
                        subscription._deliver(entries)

