"""How a generation's deltas reach the stream store: in batches, and the terminal last.

A ``StoreWriter`` belongs to one ``Generation`` and reads what it produced (its ``tokens``,
``kinds`` and ``terminal``), which each call is given: the writer keeps no reference to
the generation, so the two form no reference cycle, and a finished generation (with its
text) is freed at once instead of at the next full collection.

Room generations write each batch as soon as it is there and publish it to the room,
since members read it live. Other generations write at most once per interval, counted
from the start of the previous write: the store's ``flush_interval_s`` while a follower on
another process reads the stream (it announces itself with a ``FollowNotice``, and the
notice also triggers a write at once), else ``GATEWAY_STORE_CHECKPOINT_INTERVAL_S``. So a
paced stream costs the store and the event loop one write per interval, not one per token.

Who writes: with a store that does I/O (Redis), the generation's flusher task
(``StoreWriter.run``). With a store that writes in process (memory) and no room, there is
no such task: the producer calls ``write_between_tokens`` once the interval has passed,
and ``run`` after production writes the rest and the terminal. A task per generation
costs more than the few writes it would make.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import anyio

from config import Settings
from gateway.cluster.base import StreamMeta, StreamStore, TokenBatch
from gateway.cluster.control import RoomEnd, RoomEvent, RoomTokens
from gateway.wire.coalesce import delta_runs
from gateway.wire.codes import ErrorCode
from gateway.wire.events import DeltaKind, Failed, Terminal

logger = logging.getLogger("gateway.generation")

# How long the flusher keeps retrying the store after the generation ended.
FLUSH_GIVE_UP_S = 30.0
# How often a process following a generation through the store tells the producing
# process that it still does, as a fraction of the resume grace period.
FOLLOW_NOTICE_FRACTION = 1 / 3


def follow_notice_interval(settings: Settings) -> float:
    return max(settings.resume_grace_s * FOLLOW_NOTICE_FRACTION, 0.5)


def _now() -> float:
    # The event loop's clock, which anyio's current_time() also reads, without anyio's
    # lookup of the running async library: a generation reads it several times.
    return asyncio.get_running_loop().time()


class Produced(Protocol):
    """What the writer reads of its generation."""

    meta: StreamMeta
    tokens: list[str]
    kinds: list[DeltaKind] | None
    terminal: Terminal | None

    async def publish_room(self, *events: RoomEvent) -> None: ...


class StoreWriter:
    def __init__(self, meta: StreamMeta, store: StreamStore, settings: Settings) -> None:
        self.meta = meta
        self.store = store
        self.settings = settings
        self.in_room = meta.room is not None
        self.inline = store.writes_in_process and not self.in_room
        # Deltas before this index are in the store.
        self.stored = 0
        self.producing = True
        # While True the flusher waits out the interval: a new token need not wake it.
        self.lingering = False
        self.last_remote_follow = -float("inf")
        self.next_inline_write = 0.0
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def production_ended(self) -> None:
        self.producing = False
        self.wake()

    async def _wait(self, linger_s: float | None = None) -> None:
        """Until ``wake`` (or ``linger_s``). A bare future: this runs once per batch."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(linger_s, self.wake) if linger_s is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def followed_elsewhere(self) -> None:
        """A process following this generation through the store said so: write what is
        pending now, and keep writing at the store's pace while such notices come."""
        self.last_remote_follow = _now()
        if self.lingering:
            self.wake()

    def write_interval(self) -> float:
        """How long after the start of one write the next may start."""
        store = self.store
        if _now() - self.last_remote_follow <= follow_notice_interval(self.settings) * 2.5:
            return store.flush_interval_s
        return max(store.flush_interval_s, self.settings.store_checkpoint_interval_s)

    def pending_batch(self, produced: Produced) -> TokenBatch:
        """The deltas not yet stored, with their kinds when some are not answer text."""
        first = self.stored
        kinds = produced.kinds
        return TokenBatch(first, tuple(produced.tokens[first:]),
                          tuple(kinds[first:]) if kinds is not None else None)

    async def write_between_tokens(self, produced: Produced) -> None:
        """The producer's own write, for a store that writes in process: the deltas so far
        that are not stored. The producer appends the next delta after this, so a batch
        never holds a delta the followers have not been given."""
        self.next_inline_write = asyncio.get_running_loop().time() + self.write_interval()
        if self.stored == len(produced.tokens):
            return
        batch = self.pending_batch(produced)
        try:
            await self.store.write(self.meta, batch)
        except Exception:
            # Left for ``run`` after production, which retries and gives up in the open.
            logger.warning("stream=%s: a store write failed; it is retried when production ends", self.meta.id)
            return
        self.stored += len(batch.texts)

    async def run(self, produced: Produced) -> None:
        """Write pending deltas to the store (and the room) one batch at a time; the next
        batch is whatever accumulated while the previous write was in flight, and during
        ``write_interval`` after it started while the generation is producing. While no
        delta comes, the stream's TTL is refreshed so a slow generation stays resumable.
        Returns once the terminal is stored."""
        store = self.store
        meta = self.meta
        touch_every = max(self.settings.resume_ttl_s / 3, 1.0)
        last_write = _now()
        ended_at: float | None = None
        lost = False
        while True:
            if self.stored == len(produced.tokens):
                if not self.producing:
                    break
                await self._wait(max(last_write + touch_every - _now(), 0.0))
                if (self.stored == len(produced.tokens) and self.producing
                        and _now() - last_write >= touch_every):
                    with contextlib.suppress(Exception):
                        await store.touch(meta)
                    last_write = _now()
                continue
            batch = self.pending_batch(produced)
            started = _now()
            try:
                if self.producing or self.inline:  # an in-process write cannot be interrupted
                    await store.write(meta, batch)
                else:
                    with anyio.CancelScope(shield=True):
                        await store.write(meta, batch)
            except Exception:
                if not self.producing:
                    ended_at = ended_at if ended_at is not None else _now()
                    if _now() - ended_at > FLUSH_GIVE_UP_S:
                        logger.error("stream=%s could not store %d token(s); giving up", meta.id, len(batch.texts))
                        lost = True
                        break
                await anyio.sleep(0.2)
                continue
            last_write = _now()
            self.stored += len(batch.texts)
            if self.in_room:
                await produced.publish_room(*(RoomTokens(meta.id, last_seq, text, kind) for last_seq, text, kind
                                          in delta_runs(batch.first_seq, batch.texts, batch.kinds)))
                continue
            linger = started + self.write_interval() - _now()
            if linger > 0 and self.producing:
                self.lingering = True
                try:
                    await self._wait(linger)
                finally:
                    self.lingering = False
        await self._store_terminal(produced, lost)

    async def _store_terminal(self, produced: Produced, lost: bool) -> None:
        terminal = produced.terminal
        if terminal is None:  # the hub itself was cancelled: nothing to store
            return
        if lost:
            # The stored stream lacks its tail: a resumer must not take it for a whole answer.
            terminal = Failed(ErrorCode.BACKEND_ERROR, "stored tokens were lost; the answer is incomplete")
        if self.inline:
            # In process: nothing to wait for, and nothing that a retry would change.
            try:
                await self.store.finish(self.meta, terminal)
            except Exception:
                logger.exception("stream=%s could not store its terminal frame", self.meta.id)
            return
        with anyio.move_on_after(FLUSH_GIVE_UP_S, shield=True):
            while True:
                try:
                    await self.store.finish(self.meta, terminal)
                    break
                except Exception:
                    await anyio.sleep(0.2)
            if self.in_room:
                end: RoomEvent = RoomEnd(self.meta.id, terminal)
                await produced.publish_room(end)
            return
        # Followers elsewhere end when the stream's metadata expires (GATEWAY_RESUME_TTL_S).
        logger.error("stream=%s could not store its terminal frame", self.meta.id)
