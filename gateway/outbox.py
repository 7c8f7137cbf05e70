"""A connection's send path: the bounded send queue, the writer task, the overflow for
frames that must not wait, and the batching of what was sent into the metrics.

Ordering: frames reach the socket in the order they were queued. The writer task writes
what is queued; an item put while the queue is empty, no write is in flight and the
socket takes data may be written at once by whoever puts it (a paced token, a heartbeat),
which saves a task wake-up per frame.

Three ways in, named by whether they wait:
- ``send`` (async) waits while the queue is full: a generation's producer calls it, so a
  slow reader pauses the backend (backpressure);
- ``offer`` never waits and returns False when the queue is full (a heartbeat ping is
  simply skipped then);
- ``send_urgent`` never waits and never drops: when the queue is full the item waits in a
  bounded overflow that the writer sends after its current batch, and the slow-consumer
  clock runs; an overflow that is full too closes the connection (4003) at once.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import anyio
from anyio import ClosedResourceError
from starlette import websockets as starlette_websockets

from gateway.core.liveness import Liveness
from gateway.core.ports import Transport
from gateway.metrics import Metrics
from gateway.wire.coalesce import DELTA_TYPES, Frame, OutItem, Token, coalesce, encode_item
from gateway.wire.outbound import encode_token

# What was sent is added to the metrics at least this often, and when a stream ends.
METRICS_EVERY_FRAMES = 64
# A producer's item goes straight to the socket when nothing is queued, no write is in
# flight and the connection's last such write is at least this old; see ``Outbox.send``.
DIRECT_WRITE_GAP_S = 0.002
# A frame that may be dropped is sent only while the socket's own buffer holds less than
# this: otherwise the client is behind, and it would only delay what may not be dropped.
DROPPABLE_BACKLOG_BYTES = 4096

SendMessage = Callable[[Any], Awaitable[None]]

_WebSocketDisconnected: type[Exception] = getattr(starlette_websockets, "WebSocketDisconnected", RuntimeError)
# What a send or receive raises when the client is gone.
SOCKET_ERRORS = (starlette_websockets.WebSocketDisconnect, _WebSocketDisconnected, OSError)


class SendQueue:
    """A bounded queue: producers put items, the writer takes all that are waiting at once.

    It stands in for an anyio memory object stream with the same bounds (``put_nowait``
    refuses and ``put`` waits while ``limit`` items are queued; both raise
    ``ClosedResourceError`` once it is closed) because the writer always takes everything
    waiting, which swapping a list does in O(1), and because an idle connection then holds
    one empty list instead of a stream pair with its deque and waiter dicts. Waiting uses
    bare event-loop futures, created only while someone waits: the gateway runs on
    asyncio (uvicorn), where anyio's cancel scopes cancel such a wait like any other.
    """

    __slots__ = ("_getter", "_putters", "closed", "items", "limit", "stop_waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[OutItem] = []
        self.closed = False
        # Set when a producer waiting here must not wait any longer (see ``Outbox.stop_waiting``).
        self.stop_waiting = False
        self._getter: asyncio.Future[None] | None = None
        self._putters: list[asyncio.Future[None]] | None = None

    def put_nowait(self, item: OutItem) -> bool:
        """False when full."""
        if self.closed:
            raise ClosedResourceError
        items = self.items
        if len(items) >= self.limit:
            return False
        items.append(item)
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)
        return True

    async def put(self, item: OutItem) -> None:
        while not self.put_nowait(item):
            if self.stop_waiting:
                self.stop_waiting = False
                self.items.append(item)  # one over the limit, once: the producer moves on
                return
            waiter = asyncio.get_running_loop().create_future()
            if self._putters is None:
                self._putters = []
            self._putters.append(waiter)
            try:
                await waiter
            finally:
                if self._putters is not None and waiter in self._putters:
                    self._putters.remove(waiter)

    def take_all(self) -> list[OutItem]:
        items = self.items
        self.items = []
        self._wake_putters()
        return items

    async def wait(self) -> None:
        """Until an item is queued, the queue is closed or ``nudge`` is called."""
        if self.items or self.closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._getter = waiter
        try:
            await waiter
        finally:
            if self._getter is waiter:
                self._getter = None

    def nudge(self) -> None:
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)

    def close(self) -> None:
        self.closed = True
        self.nudge()
        self._wake_putters()

    def _wake_putters(self) -> None:
        putters = self._putters
        if putters:
            self._putters = None
            for waiter in putters:
                if not waiter.done():
                    waiter.set_result(None)


class OutboxOwner(Protocol):
    """What the outbox needs of its connection."""

    @property
    def closing(self) -> bool: ...

    @property
    def running(self) -> bool:
        """Whether the connection's task group is running (it serves)."""

    @property
    def following(self) -> bool:
        """Whether the connection follows a generation: the writer then keeps waiting."""

    def start_task(self, func: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Start ``func`` in the connection's task group; False when it is not running."""

    def slow_consumer_clock_started(self) -> None:
        """The queue filled up: the slow-consumer deadline moved earlier."""

    def slow_consumer(self) -> None: ...

    def socket_gone(self) -> None: ...

    def follow_ended(self, follow: Any) -> None: ...


class _Released:
    """The owner of an outbox whose connection has ended: closed to everything."""

    closing = True
    running = False
    following = False

    def start_task(self, func: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        return False

    def slow_consumer_clock_started(self) -> None:
        return None

    def slow_consumer(self) -> None:
        return None

    def socket_gone(self) -> None:
        return None

    def follow_ended(self, follow: Any) -> None:
        return None


RELEASED: OutboxOwner = _Released()


class Outbox:
    """What one idle connection holds here is small on purpose: an empty list, and no task
    (the writer runs only while there is something to write or a generation to follow)."""

    __slots__ = (
        "_last_direct_write",
        "_overflow",
        "_overflow_drained",
        "_sent_frames",
        "_sent_merged",
        "_sent_tokens",
        "_writer_exited",
        "_writer_idle",
        "_writer_running",
        "liveness",
        "metrics",
        "owner",
        "queue",
        "send_message",
        "transport",
    )

    def __init__(self, owner: OutboxOwner, limit: int, send_message: SendMessage, transport: Transport | None,
                 liveness: Liveness, metrics: Metrics) -> None:
        self.owner = owner
        self.queue = SendQueue(limit)
        self.send_message = send_message
        self.transport = transport
        self.liveness = liveness
        self.metrics = metrics
        # Frames that must not wait when the queue is full; see ``send_urgent``. Both exist
        # exactly while the overflow holds frames or the writer is sending its last one,
        # and ``_overflow_drained`` is set when they are dropped.
        self._overflow: deque[OutItem] | None = None
        self._overflow_drained: anyio.Event | None = None
        self._writer_running = False
        self._writer_idle = False
        self._writer_exited: anyio.Event | None = None
        self._last_direct_write = -math.inf
        # Frames, tokens and merged tokens sent but not yet added to the metrics.
        self._sent_frames = 0
        self._sent_tokens = 0
        self._sent_merged = 0

    # Ways in ------------------------------------------------------------------------------

    def send_now(self, item: OutItem) -> bool:
        """Write ``item`` to the socket at once if that cannot overtake another frame; False
        (nothing written) otherwise. No coroutine: a paced token costs one call here.

        A paced token (an LLM's: tens of milliseconds apart) finds the queue empty and the
        socket writable, and is written by the producer itself, which saves waking the
        writer task for every token. Tokens that follow each other closely (within
        ``DIRECT_WRITE_GAP_S``) go to the writer instead, which merges whatever waits into
        one frame: at full speed only the first token of a burst is written directly.
        Frames that are not deltas (a stream's start and end) have nothing to merge with and
        go straight out whenever that keeps the order, which saves starting the writer for
        the end frame that follows a stream's last token.
        Order holds because a direct write happens only while nothing is queued, nothing
        waits in the overflow and the writer is not writing."""
        transport = self.transport
        if transport is None or self._overflow or not self._writer_quiet() or self.owner.closing:
            return False
        tokens = 1 if type(item) is Token or isinstance(item, DELTA_TYPES) else 0
        if tokens:
            # The loop's clock, not anyio's: this runs once per paced token.
            now = asyncio.get_running_loop().time()
            if now - self._last_direct_write < DIRECT_WRITE_GAP_S:
                return False
            self._last_direct_write = now
        text = encode_token(item.stream.id_json, item.seq, item.text) if type(item) is Token else encode_item(item)
        if not transport.send_texts([text]):
            return False
        self._sent_frames += 1
        self._sent_tokens += tokens
        if self._sent_frames >= METRICS_EVERY_FRAMES:
            self.report_sent()
        return True

    async def send(self, item: OutItem) -> None:
        """Queue ``item``, waiting while the queue is full (or written at once: see
        ``send_now``). It waits while items wait in the overflow: those are older and go
        out first."""
        while self._overflow:
            if self.owner.closing:
                raise ClosedResourceError
            drained = self._overflow_drained
            assert drained is not None
            await drained.wait()
        if self.send_now(item):
            return
        # ``send_queued``, inline: this is the path of every token at full speed.
        queue = self.queue
        if not queue.put_nowait(item):
            if self.liveness.queue_full(anyio.current_time()):
                self.owner.slow_consumer_clock_started()
            await queue.put(item)
        if not self._writer_running:
            self.start_writer()

    async def send_queued(self, item: OutItem) -> None:
        """Queue ``item`` for the writer (never written directly), waiting while full."""
        queue = self.queue
        if not queue.put_nowait(item):
            if self.liveness.queue_full(anyio.current_time()):
                self.owner.slow_consumer_clock_started()
            await queue.put(item)
        if not self._writer_running:
            self.start_writer()

    def offer(self, item: OutItem) -> bool:
        """Queue ``item`` without waiting; False when the queue is full or closed."""
        queue = self.queue
        if (type(item) is Frame and self.transport is not None and self.owner.running and not queue.closed
                and self._writer_quiet() and self.transport.send_texts([item.text])):
            # A heartbeat or a broadcast goes out now, without starting the writer task
            # for one frame.
            self._count_sent(1, 0, 0)
            return True
        try:
            if not queue.put_nowait(item):
                return False
        except ClosedResourceError:
            return False
        if not self._writer_running:
            self.start_writer()
        return True

    def send_droppable(self, item: OutItem) -> bool:
        """Send ``item`` only if the connection is caught up: nothing queued, nothing in the
        overflow, the writer idle and little waiting in the socket's buffer; False, with
        nothing sent, otherwise. For frames that may be lost (presence): they must never
        take a slow reader's bandwidth from what may not be lost, nor be why it is closed
        as a slow consumer."""
        if self.owner.closing or self._overflow or not self._writer_quiet():
            return False
        transport = self.transport
        if transport is not None and transport.write_backlog > DROPPABLE_BACKLOG_BYTES:
            return False
        return self.offer(item)

    def stop_waiting(self) -> None:
        """A producer waiting for room here stops waiting: its item is queued over the
        limit, once. A generation calls this when a newer follower arrives while it waits
        on this one, which may be a dead socket: from then on this follower gets the
        generation's items without holding it back (``send_urgent``)."""
        queue = self.queue
        if queue._putters:
            queue.stop_waiting = True
            queue._wake_putters()

    def follow_ended(self, follow: Any) -> None:
        """The outbox is the ``Follower`` a generation delivers to; the end of a follow is
        the connection's business."""
        self.owner.follow_ended(follow)

    def send_urgent(self, item: OutItem) -> None:
        """Queue ``item`` without waiting and without dropping it (see the module's doc)."""
        if self.owner.closing:
            return
        overflow = self._overflow
        if not overflow and self.offer(item):
            return
        if overflow is None:
            overflow = self._overflow = deque()
            self._overflow_drained = anyio.Event()
        elif len(overflow) >= self.queue.limit:
            self.owner.slow_consumer()
            return
        overflow.append(item)
        if self.liveness.queue_full(anyio.current_time()):
            self.owner.slow_consumer_clock_started()

    # The writer ---------------------------------------------------------------------------

    def _writer_quiet(self) -> bool:
        """Nothing is queued and the writer is not writing: a frame written to the socket
        now cannot overtake another."""
        return not self.queue.items and (self._writer_idle or not self._writer_running)

    def start_writer(self) -> None:
        queue = self.queue
        if not self._writer_running and (queue.items or queue.closed) and self.owner.start_task(self._writer):
            self._writer_running = True

    async def close_and_flush(self) -> None:
        """Close the queue and wait until the writer has written what it holds."""
        self.queue.close()
        self.start_writer()
        if self._writer_running:
            self._writer_exited = exited = anyio.Event()
            await exited.wait()

    def close(self) -> None:
        """The connection ends: nothing more is queued, and a producer waiting for the
        overflow to drain finds the queue closed."""
        self.report_sent()
        self.queue.close()
        self._drop_overflow()

    def release(self) -> None:
        """The connection has ended: let go of it. The two point at each other, and
        without this only a full collection would free them; whatever still reaches this
        outbox (a generation finishing its last delivery) finds it closed."""
        self.owner = RELEASED

    def nudge(self) -> None:
        """A waiting writer with nothing left to follow may stop."""
        self.report_sent()
        self.queue.nudge()

    async def _writer(self) -> None:
        """Writes whatever is queued, merged per stream. It runs while items are queued or
        while the connection follows a generation, and stops when neither holds; the next
        item queued starts it again."""
        queue = self.queue
        send = self.send_message
        transport = self.transport
        liveness = self.liveness
        owner = self.owner
        try:
            while True:
                if not queue.items:
                    if queue.closed or not owner.following:
                        return
                    self._writer_idle = True
                    try:
                        await queue.wait()
                    finally:
                        self._writer_idle = False
                    continue
                batch = queue.take_all()
                if liveness.queue_full_since is not None:
                    liveness.queue_drained()
                frames, tokens, merged = coalesce(batch)
                # Straight to the socket while it takes data without waiting; through ASGI
                # (which waits for the transport to drain) otherwise.
                if transport is None or not transport.send_texts(frames):
                    for text in frames:
                        await send({"type": "websocket.send", "text": text})
                sent = len(frames)
                overflow = self._overflow
                if overflow is not None:
                    # What was queued while that batch went out is older than the overflow
                    # (items go to the overflow only once the queue is full): it goes first.
                    frames, tokens_before, merged_before = coalesce(queue.take_all())
                    for text in frames:
                        await send({"type": "websocket.send", "text": text})
                    sent += len(frames)
                    tokens += tokens_before
                    merged += merged_before
                    while overflow:
                        await send({"type": "websocket.send", "text": encode_item(overflow.popleft())})
                        sent += 1
                    self._drop_overflow()
                self._count_sent(sent, tokens, merged)
        except SOCKET_ERRORS:
            owner.socket_gone()
        finally:
            self.report_sent()
            self._writer_running = False
            if self._writer_exited is not None:
                self._writer_exited.set()

    def _drop_overflow(self) -> None:
        self._overflow = None
        drained = self._overflow_drained
        if drained is not None:
            self._overflow_drained = None
            drained.set()

    # Metrics ------------------------------------------------------------------------------

    def _count_sent(self, frames: int, tokens: int, merged: int) -> None:
        # Added to the metrics in batches: a paced stream sends one frame per wake-up,
        # and three locked counter increments per frame were a measurable share of it.
        self._sent_frames += frames
        self._sent_tokens += tokens
        self._sent_merged += merged
        if self._sent_frames >= METRICS_EVERY_FRAMES:
            self.report_sent()

    def report_sent(self) -> None:
        frames = self._sent_frames
        if not frames:
            return
        tokens = self._sent_tokens
        merged = self._sent_merged
        self._sent_frames = self._sent_tokens = self._sent_merged = 0
        metrics = self.metrics
        metrics.frames_sent.inc(frames)
        if tokens:
            metrics.tokens_sent.inc(tokens)
        if merged:
            metrics.coalesced_tokens.inc(merged)


