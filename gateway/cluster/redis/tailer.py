"""One reading loop per process for every stored stream followed here.

A client resuming a generation that runs on another process reads the generation's Redis
Stream: first what is stored (plain reads, see ``RedisStreamStore.follow``), then the live
tail. The tail of every such follower of this process comes from ``StreamTailer.run``, on a
client of its own: non-blocking reads, one ``XREAD`` per hash slot with every followed key
of that slot (a user's streams share one), all in one pipeline, which a cluster client
splits by node. So 500 followers cost one small client and one pipeline per batch of new
entries, not 500 connections each blocked in a read, and they cannot exhaust the command
pool.

A read is made when it can find something: the producing process, after the commit that
wrote a followed stream, sends a "written" notice to the follower's process (it learned the
process from the follow notice), and this process's own commits wake it directly. A lost
notice only delays: every followed stream is read at least every ``TAIL_POLL_S``.

A subscription holds what the tailer read for it until its follower takes it, and is left
out of the reads until then: a slow follower holds at most one read's worth
(``TAIL_COUNT`` entries) and slows no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import anyio
from redis.exceptions import RedisError

from gateway.cluster.redis.context import CLOSE_TIMEOUT_S, RedisContext, slot_of
from gateway.cluster.redis.wakeup import Wakeup

logger = logging.getLogger("gateway.redis")

# Entries per key per read, and the longest a followed stream goes without a read.
TAIL_COUNT = 512
TAIL_POLL_S = 1.0

Entry = tuple[str, dict[str, str]]


def entry_order(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


class Subscription:
    """One follower's place in one stream: entries after ``last_id`` not yet taken."""

    __slots__ = ("_arrived", "entries", "full", "key", "last_id")

    def __init__(self, key: str, last_id: str) -> None:
        self.key = key
        self.last_id = last_id
        self.entries: deque[Entry] = deque()
        self.full = False  # the last read filled its count: more may be waiting
        self._arrived = Wakeup()

    def _deliver(self, entries: list[Entry]) -> None:
        after = entry_order(self.last_id)
        fresh = [entry for entry in entries if entry_order(entry[0]) > after]
        self.full = len(entries) >= TAIL_COUNT
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
        self._due: set[str] = set()  # keys to read at once
        # Keys that had news while every follower of theirs still held entries: read when
        # one takes them.
        self._deferred: set[str] = set()
        self._changed = Wakeup()
        # Reads made (pipelines), for tests and benchmarks.
        self.reads = 0

    @property
    def followed(self) -> int:
        return sum(len(subscriptions) for subscriptions in self._subscriptions.values())

    def subscribe(self, key: str, last_id: str) -> Subscription:
        subscription = Subscription(key, last_id)
        self._subscriptions.setdefault(key, []).append(subscription)
        self._read_soon(key)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self._subscriptions.get(subscription.key)
        if subscriptions is None:
            return
        if subscription in subscriptions:
            subscriptions.remove(subscription)
        if not subscriptions:
            del self._subscriptions[subscription.key]
            self._due.discard(subscription.key)
            self._deferred.discard(subscription.key)

    def taken(self, subscription: Subscription) -> None:
        """The follower took its entries: read its key again if the last read may have left
        some behind, or news came while it held them."""
        key = subscription.key
        if not subscription.entries and (subscription.full or key in self._deferred):
            self._deferred.discard(key)
            self._read_soon(key)

    def written(self, keys: list[str]) -> None:
        """These streams have new entries (a notice, or this process's own commit)."""
        woke = False
        for key in keys:
            if key in self._subscriptions:
                self._due.add(key)
                woke = True
        if woke:
            self._changed.wake()

    def _read_soon(self, key: str) -> None:
        self._due.add(key)
        self._changed.wake()

    def _wanted(self, keys: set[str] | None) -> dict[int, dict[str, str]]:
        """Each key to read (every followed key when ``keys`` is None), grouped by slot,
        from the earliest position of its followers that have taken everything read for
        them so far. A key none of whose followers has is deferred."""
        wanted: dict[int, dict[str, str]] = {}
        for key, subscriptions in self._subscriptions.items():
            if keys is not None and key not in keys:
                continue
            ready = [s.last_id for s in subscriptions if not s.entries]
            if ready:
                wanted.setdefault(slot_of(key), {})[key] = min(ready, key=entry_order)
            else:
                self._deferred.add(key)
        return wanted

    async def run(self) -> None:
        """Read for every subscription until cancelled. Redis errors are waited out here;
        the subscriptions keep their places."""
        client = self.ctx.dedicated_client(socket_timeout=10)
        try:
            await self._read(client)
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True), contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _read(self, client: Any) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        polled_at = loop.time()
        while True:
            if not self._due:
                await self._changed.wait(max(polled_at + TAIL_POLL_S - loop.time(), 0.0))
            poll = loop.time() - polled_at >= TAIL_POLL_S
            keys = None if poll else self._due
            wanted = self._wanted(keys)
            self._due = set()
            if poll:
                polled_at = loop.time()
            if not wanted:
                continue
            pipe = client.pipeline(transaction=False)
            for streams in wanted.values():
                pipe.xread(streams, count=TAIL_COUNT)
            try:
                responses: list[Any] = await pipe.execute()
                self.ctx.report(True)
                backoff = 0.1
            except (RedisError, OSError) as exc:
                self.ctx.report_error(exc)
                for streams in wanted.values():
                    self._due.update(streams)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self.reads += 1
            for streams, response in zip(wanted.values(), responses, strict=True):
                found = {key: entries for key, entries in response or ()}
                for key in streams:
                    entries = found.get(key, [])
                    for subscription in self._subscriptions.get(key, ()):
                        if not subscription.entries:
                            subscription._deliver(entries)
