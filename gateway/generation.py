"""A generation runs in the hub, not in a connection: a dropped socket does not end it.

Who owns what:
- The hub's task group owns every ``Generation.run``. A generation ends when its backend
  finishes, when it is cancelled (a ``cancel``, nobody resumed it within the grace
  period, the drain timeout, the token expiry of the connection following it), or when
  the backend fails. Exactly one terminal event (``Done`` or ``Failed``) is produced, and
  it is stored. Nothing here encodes for the wire: followers get typed items.
- Connections *follow* a generation. A local follower gets every token pushed into its
  send queue by the producer, which waits when the queue is full: a slow reader pauses
  the backend (backpressure). A generation with no followers runs at the backend's pace.
- Tokens are also batched into the stream store, so a client can resume on any process,
  by the generation's ``StoreWriter`` (gateway/store_writer.py): one write per interval,
  not one per token, and the terminal last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from anyio import BrokenResourceError, ClosedResourceError

from config import Settings
from gateway.backends import Backend, FinishChunk, GenerationRequest, ReasoningChunk, TokenChunk, ToolCallChunk
from gateway.cluster.base import Lease, StreamMeta, StreamStore
from gateway.cluster.control import ControlMessage, RoomEvent, RoomEvents, RoomStart
from gateway.core.ports import Follower
from gateway.metrics import Metrics
from gateway.store_writer import StoreWriter
from gateway.wire.coalesce import End, OutItem, Start, StreamRef, Token, delta_item
from gateway.wire.errors import GatewayError, failure
from gateway.wire.events import REASONING, TEXT, DeltaKind, Done, Failed, Terminal, ToolCallDelta, Usage

logger = logging.getLogger("gateway.generation")

# How long a backend iterator gets to run its cleanup after the gateway stops it.
ACLOSE_TIMEOUT_S = 2.0
# After max_tokens, how long to wait for the backend's own FinishChunk (its usage).
FINISH_AFTER_LIMIT_WAIT_S = 1.0

class Host(Protocol):
    """What a generation needs of the process that runs it (the hub)."""

    settings: Settings
    backend: Backend
    metrics: Metrics
    store: StreamStore

    def generation_ended(self, generation: Generation, outcome: str) -> None: ...

    def generation_detached(self, generation: Generation) -> None: ...

    async def publish(self, message: ControlMessage) -> None: ...


@dataclass(eq=False)
class Follow:
    """One connection following one local generation.

    While ``live`` is False the follower is still replaying earlier tokens, and new items
    wait in ``backlog``; the follower switches to live once the backlog is empty, with no
    await in between, so nothing is lost or reordered at the hand-over.
    """

    sink: Follower
    generation: Generation
    live: bool = True
    backlog: list[OutItem] = field(default_factory=list)
    ended: anyio.Event = field(default_factory=anyio.Event)

    def deliver_nowait(self, item: OutItem) -> None:
        if not self.live:
            self.backlog.append(item)
        else:
            self.sink.send_urgent(item)

    async def deliver(self, item: OutItem) -> bool:
        """False when the follower is gone (its queue closed)."""
        if not self.live:
            self.backlog.append(item)
            return True
        try:
            await self.sink.send(item)
            return True
        except (ClosedResourceError, BrokenResourceError):
            return False


class Generation:
    def __init__(self, hub: Host, meta: StreamMeta, request: GenerationRequest, lease: Lease,
                 accepted_at: float, transport: str = "ws") -> None:
        self.hub = hub
        # How it was asked for ("ws" or "http"): a label of its metrics, and which resume
        # grace applies when its last follower goes away.
        self.transport = transport
        self.meta = meta
        self.request = request
        self.lease = lease
        self.accepted_at = accepted_at
        self.ref = StreamRef.of(meta.id)
        # Every delta so far, in seq order: its text (a tool call's: an arguments fragment),
        # and its kind, in a parallel list created by the first delta that is not answer
        # text (None while every delta is text, which costs nothing per token).
        self.tokens: list[str] = []
        self.kinds: list[DeltaKind] | None = None
        self.follows: list[Follow] = []
        self.scope = anyio.CancelScope()
        self.finished = anyio.Event()
        self.terminal: Terminal | None = None
        self.cancel_terminal: Failed | None = None
        self.cancel_outcome = "cancelled"
        self.detached_at: float | None = None
        # The follower the producer is waiting on for room (backpressure), if any.
        self._waiting_on: Follow | None = None
        # Batches the deltas into the stream store (see gateway/store_writer.py).
        self.writer = StoreWriter(meta, hub.store, hub.settings)
        self._ended = False

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def key(self) -> tuple[str, str]:
        return (self.meta.user, self.meta.id)

    @property
    def last_remote_follow(self) -> float:
        """When a process following this generation through the store last said so."""
        return self.writer.last_remote_follow

    def followed_elsewhere(self) -> None:
        self.writer.followed_elsewhere()

    def start_item(self, *, resumed: bool = False) -> Start:
        return Start(self.ref, self.meta.epoch, self.meta.room, resumed)

    # Followers -------------------------------------------------------------------------

    def follow(self, sink: Follower) -> Follow:
        follow = Follow(sink, self)
        self.follows.append(follow)
        self.detached_at = None
        self._stop_waiting_for_an_older_follower()
        return follow

    def attach_for_resume(self, sink: Follower, after: int) -> tuple[Follow, list[OutItem]]:
        """A follower that first replays the deltas after ``after`` (returned, of every
        kind); see ``Follow``."""
        first = max(after + 1, 0)
        follow = Follow(sink, self, live=False)
        self.follows.append(follow)
        self.detached_at = None
        self._stop_waiting_for_an_older_follower()
        return follow, self.replay(first)

    def replay(self, first: int) -> list[OutItem]:
        """The queue items of the deltas from ``first`` on."""
        ref = self.ref
        texts = self.tokens[first:]
        kinds = self.kinds
        if kinds is None:
            return [Token(ref, first + offset, text) for offset, text in enumerate(texts)]
        return [delta_item(ref, first + offset, text, kind)
                for offset, (text, kind) in enumerate(zip(texts, kinds[first:], strict=True))]

    def _stop_waiting_for_an_older_follower(self) -> None:
        """Only the newest follower holds the producer back. If the producer is waiting on
        an older one (a socket not yet known dead, whose queue is full), it stops waiting
        now rather than when that socket is declared dead, which could be a minute away."""
        waiting_on = self._waiting_on
        if waiting_on is not None and waiting_on is not self.follows[-1]:
            waiting_on.sink.stop_waiting()

    def detach(self, follow: Follow) -> None:
        """The follower's connection went away (not a cancel)."""
        if follow in self.follows:
            self.follows.remove(follow)
            if not self.follows and not self.finished.is_set():
                self.detached_at = anyio.current_time()
                self.hub.generation_detached(self)

    def cancel(self, terminal: Failed | None = None, outcome: str = "cancelled") -> None:
        """Stop the generation; ``terminal`` (default: done, cancelled) becomes how it ends."""
        if self.scope.cancel_called or self.finished.is_set():
            return
        self.cancel_terminal = terminal
        self.cancel_outcome = outcome
        self.scope.cancel()

    # Running ---------------------------------------------------------------------------

    async def run(self) -> None:
        outcome = "error"
        try:
            if self.writer.inline:
                outcome = await self._produce_and_deliver()
                # What is left, then the terminal: the flusher's last round, run here.
                await self.writer.run(self)
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.writer.run, self)
                    outcome = await self._produce_and_deliver()
                    # Leaving the task group waits for the flusher to store the rest.
        finally:
            with anyio.CancelScope(shield=True):
                await self._end(outcome)
            self.finished.set()

    async def _produce_and_deliver(self) -> str:
        try:
            if self.meta.room is not None:
                await self.publish_room(RoomStart(self.meta.id, self.meta.epoch))
            terminal, outcome = await self._produce()
            # Set before the flusher can run again: it stores the terminal last.
            self.terminal = terminal
        finally:
            self.writer.production_ended()
        await self._deliver_terminal(terminal)
        await self._end(outcome)
        return outcome

    async def _end(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.hub.generation_ended(self, outcome)
        await self.lease.release()

    async def _produce(self) -> tuple[Terminal, str]:
        hub = self.hub
        request = self.request
        ref = self.ref
        count = 0
        reasoning = 0
        # Each tool call's index, once its first fragment went out: the kind of the rest.
        calls: dict[int, ToolCallDelta] = {}
        terminal: Terminal
        outcome: str
        writer = self.writer
        writes_inline = writer.inline
        loop = asyncio.get_running_loop()
        writer.next_inline_write = loop.time() + writer.write_interval()
        try:
            with self.scope:
                finish: FinishChunk | None = None
                follows = self.follows
                # The start frame goes out before any token: followers registered before run().
                start = self.start_item()
                for follow in tuple(follows):
                    if not await follow.deliver(start):
                        self.detach(follow)
                iterator = hub.backend.stream(request)
                try:
                    async for chunk in iterator:
                        if isinstance(chunk, TokenChunk):
                            text = chunk.text
                            if not text:
                                continue
                            kind: DeltaKind = TEXT
                        elif isinstance(chunk, ReasoningChunk):
                            text = chunk.text
                            if not text:
                                continue
                            kind = REASONING
                            reasoning += 1
                        elif isinstance(chunk, ToolCallChunk):
                            text = chunk.arguments
                            kind = calls.get(chunk.index) or ToolCallDelta(chunk.index, chunk.call_id, chunk.name)
                            if chunk.index not in calls:
                                # Later fragments of this call carry its arguments only.
                                calls[chunk.index] = ToolCallDelta(chunk.index)
                            elif not text:
                                continue
                        elif isinstance(chunk, FinishChunk):
                            finish = chunk
                            break
                        else:  # a kind of chunk this gateway does not know
                            continue  # type: ignore[unreachable]
                        if count == 0:
                            hub.metrics.ttft.labels(self.transport).observe(loop.time() - self.accepted_at)
                        if writes_inline:
                            if loop.time() >= writer.next_inline_write:
                                await writer.write_between_tokens(self)
                        elif writer.stored == count and not writer.lingering:
                            writer.wake()
                        self.tokens.append(text)
                        kinds = self.kinds
                        if kinds is not None:
                            kinds.append(kind)
                        elif kind is not TEXT:
                            self.kinds = kinds = [TEXT] * count
                            kinds.append(kind)
                        if follows:
                            item = Token(ref, count, text) if kind is TEXT else delta_item(ref, count, text, kind)
                            if len(follows) == 1:
                                # Read it once: a follower may be detached during the await.
                                only = follows[0]
                                # A paced token goes straight to the socket, with no
                                # coroutine in between; anything else is delivered.
                                if not (only.live and only.sink.send_now(item)):
                                    self._waiting_on = only
                                    delivered = await only.deliver(item)
                                    self._waiting_on = None
                                    if not delivered:
                                        self.detach(only)
                            else:
                                # Several connections follow (a resume while the old
                                # socket is not yet known dead, or two tabs): only the
                                # newest applies backpressure; the others must keep up
                                # or are closed as slow consumers, so a dead socket
                                # cannot stall a live one.
                                *others, newest = follows
                                for follow in others:
                                    follow.deliver_nowait(item)
                                self._waiting_on = newest
                                delivered = await newest.deliver(item)
                                self._waiting_on = None
                                if not delivered:
                                    self.detach(newest)
                        count += 1
                        if count >= request.max_tokens:
                            finish = await self._finish_after_limit(iterator)
                            break
                finally:
                    aclose: Callable[[], Awaitable[object]] | None = getattr(iterator, "aclose", None)
                    if aclose is not None:
                        with anyio.move_on_after(ACLOSE_TIMEOUT_S, shield=True):
                            await aclose()
                finish = finish or FinishChunk("stop")
                prompt_tokens = finish.prompt_tokens if finish.prompt_tokens is not None else 0
                # A backend's own count (model tokens, from the upstream's usage) wins over the
                # number of chunks the gateway saw.
                if finish.completion_tokens is not None:
                    completion_tokens, reasoning_tokens = finish.completion_tokens, finish.reasoning_tokens
                else:
                    completion_tokens, reasoning_tokens = count, finish.reasoning_tokens or reasoning or None
                terminal = Done(finish.finish_reason, Usage(prompt_tokens, completion_tokens, reasoning_tokens,
                                                            finish.cached_tokens), finish.route)
                outcome = finish.finish_reason
            if self.scope.cancelled_caught:
                # What was streamed, whatever its kind.
                terminal = self.cancel_terminal or Done("cancelled", Usage(0, count, reasoning or None))
                outcome = self.cancel_outcome
        except Exception as exc:
            if isinstance(exc, GatewayError):
                logger.info("user=%s stream=%s generation failed: %s", self.meta.user, request.id, exc.code)
            else:
                logger.exception("user=%s stream=%s backend raised", self.meta.user, request.id)
            terminal = failure(exc)
            outcome = terminal.code
            hub.metrics.errors.labels(terminal.code).inc()
        return terminal, outcome

    @staticmethod
    async def _finish_after_limit(iterator: Any) -> FinishChunk:
        """``max_tokens`` reached. A backend that honours it sends its FinishChunk (with the
        upstream's usage) next; wait briefly for it, and never pass on a token beyond."""
        with anyio.move_on_after(FINISH_AFTER_LIMIT_WAIT_S):
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return FinishChunk("length")
            if isinstance(chunk, FinishChunk):
                return chunk
        return FinishChunk("length")

    async def _deliver_terminal(self, terminal: Terminal) -> None:
        item = End(self.ref, terminal)
        for follow in tuple(self.follows):
            # Written at once when the follower is caught up; otherwise queued, waiting at
            # most the slow-consumer timeout for room.
            if not (follow.live and follow.sink.send_now(item)):
                with anyio.move_on_after(self.hub.settings.slow_consumer_timeout_s, shield=True):
                    await follow.deliver(item)
            follow.sink.follow_ended(follow)
            follow.ended.set()
        self.follows.clear()

    async def publish_room(self, *events: RoomEvent) -> None:
        assert self.meta.room is not None
        try:
            await self.hub.publish(RoomEvents(self.meta.room, events))
        except Exception:
            logger.warning("room=%s stream=%s could not publish frames", self.meta.room, self.meta.id)
