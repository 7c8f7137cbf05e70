"""One authenticated WebSocket connection: reader, writer, deadlines and its generations.

The reader and writer run in one task group owned by ``Connection.serve``; the deadlines
(heartbeat pings, staleness, slow consumer, token expiry) in the hub's timer, which calls
``Connection.on_deadline``. Ownership rules:

- Frames reach the socket in queue order. The writer task writes what is queued; a frame
  put while the queue is empty, no write is in flight and the socket takes data may be
  written at once by whoever puts it (a paced token, a heartbeat), which saves a task
  wake-up per frame. Otherwise items go into the bounded send queue; a producer that finds
  it full waits, which pauses its backend (backpressure).
- Whatever decides the connection must end calls ``_request_close`` once; ``serve`` then
  either finishes gracefully (generations get their terminal frames, the queue is flushed,
  then the close frame) or abruptly (everything is cancelled and the socket is closed
  without waiting for a client that may not be reading).
- Every generation ends with exactly one terminal frame unless the socket is already gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio import ClosedResourceError
from starlette import websockets as starlette_websockets
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.auth import Principal
from gateway.backends import ChatTurn, GenerationRequest
from gateway.generation import Follow, Generation
from gateway.hub import Hub
from gateway.liveness import Due, Liveness
from gateway.server import TRANSPORT_EXTENSION, TransportControl
from gateway.store.base import StreamMeta, TokenBatch
from gateway.wire.coalesce import Frame, OutItem, StreamRef, Token, coalesce, encode_item
from gateway.wire.codes import CloseCode, ErrorCode
from gateway.wire.errors import FrameError, GatewayError
from gateway.wire.inbound import (
    AuthMessage,
    CancelMessage,
    GenerateMessage,
    JoinMessage,
    LeaveMessage,
    PingMessage,
    ResumeMessage,
    parse_client_frame,
)
from gateway.wire.outbound import (
    PING_FRAME,
    PONG_FRAME,
    encode_error,
    encode_exception,
    encode_hello,
    encode_presence,
    encode_room_ack,
    encode_start,
    encode_token,
)

logger = logging.getLogger("gateway.connection")

_WebSocketDisconnected: type[Exception] = getattr(starlette_websockets, "WebSocketDisconnected", RuntimeError)
_SOCKET_GONE = (WebSocketDisconnect, _WebSocketDisconnected, OSError)

# How long a graceful close may take to flush terminal frames before it turns abrupt.
GRACEFUL_FLUSH_TIMEOUT_S = 5.0
# What was sent is added to the metrics at least this often, and when a stream ends.
METRICS_EVERY_FRAMES = 64
# A producer's item goes straight to the socket when nothing is queued, no write is in
# flight and the connection's last such write is at least this old; see ``Connection.put``.
DIRECT_WRITE_GAP_S = 0.002


def new_stream_id() -> str:
    return "g-" + secrets.token_hex(8)


def new_epoch() -> str:
    return "e-" + secrets.token_hex(6)


# How often a connection following a generation through the store tells the producing
# process that it is still there, as a fraction of the resume grace period.
FOLLOW_NOTICE_FRACTION = 1 / 3


@dataclass(eq=False)
class RemoteFollow:
    """Following a generation through the stream store (it runs on another process, or it
    has finished). Owned by a task in the connection's task group."""

    meta: StreamMeta
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class SendQueue:
    """A connection's bounded send queue: producers put items, the writer takes all that
    are waiting at once.

    It stands in for an anyio memory object stream with the same bounds (``put_nowait``
    refuses and ``put`` waits while ``limit`` items are queued; both raise
    ``ClosedResourceError`` once it is closed) because the writer always takes everything
    waiting, which swapping a list does in O(1), and because an idle connection then holds
    one empty list instead of a stream pair with its deque and waiter dicts. Waiting uses
    bare event-loop futures, created only while someone waits: the gateway runs on
    asyncio (uvicorn), where anyio's cancel scopes cancel such a wait like any other.
    """

    __slots__ = ("_getter", "_putters", "closed", "items", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[OutItem] = []
        self.closed = False
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


class Connection:
    """What one connection holds while it is idle is kept small on purpose (a process may
    hold tens of thousands): its deadlines live in the hub's timer, its writer task runs
    only while there is something to write or a generation to follow, and the reader runs
    in the task that serves the connection."""

    __slots__ = (
        "_cancel_answers",
        "_final_frames",
        "_generation_terminal",
        "_graceful",
        "_last_direct_write",
        "_overflow",
        "_overflow_drained",
        "_queue",
        "_rooms_claim",
        "_sent_frames",
        "_sent_merged",
        "_sent_tokens",
        "_socket_gone",
        "_task_group",
        "_writer_exited",
        "_writer_idle",
        "_writer_running",
        "close_code",
        "close_reason",
        "closing",
        "follows",
        "hub",
        "liveness",
        "rooms",
        "session_id",
        "settings",
        "transport",
        "user",
        "websocket",
    )

    def __init__(self, hub: Hub, websocket: WebSocket, principal: Principal, session_id: str) -> None:
        self.hub = hub
        self.settings = hub.settings
        self.websocket = websocket
        self.user = principal.user
        self.session_id = session_id
        transport = websocket.scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
        self.transport: TransportControl | None = transport if isinstance(transport, TransportControl) else None
        settings = self.settings
        self._queue = SendQueue(settings.send_queue_size)
        # The one claim consulted after the handshake; the principal and its other claims
        # are not kept for as long as the connection is open.
        self._rooms_claim = principal.claims.get(settings.rooms_claim)
        now = anyio.current_time()
        expires_at = None
        if principal.expires_at is not None:
            expires_at = now + (principal.expires_at + settings.jwt_leeway_s - time.time())
        self.liveness = Liveness(
            now=now,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
            slow_consumer_timeout_s=settings.slow_consumer_timeout_s,
            token_expires_at=expires_at,
        )
        self.follows: dict[str, Follow | RemoteFollow] = {}
        # Created on first use, like the overflow below: most connections never join a
        # room or cancel a generation they do not follow, and an empty set is 216 bytes.
        self.rooms: set[str] | None = None
        self.closing = False
        self._cancel_answers: set[str] | None = None
        # Frames that must not wait (broadcasts, room frames, extra followers) when the
        # queue is full; see ``push``. Both exist exactly while the overflow holds frames
        # or the writer is sending its last one, and ``_overflow_drained`` is set when
        # they are dropped.
        self._overflow: deque[Frame] | None = None
        self._overflow_drained: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._writer_running = False
        self._writer_idle = False
        self._writer_exited: anyio.Event | None = None
        self._last_direct_write = -math.inf
        # Frames, tokens and merged tokens sent but not yet added to the metrics.
        self._sent_frames = 0
        self._sent_tokens = 0
        self._sent_merged = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._graceful = False
        self._generation_terminal: tuple[ErrorCode, str] | None = None
        self._final_frames: tuple[str, ...] = ()
        self._socket_gone = False

    # Lifecycle ------------------------------------------------------------------------------

    def _log(self, level: int, message: str, *args: Any, stream: str | None = None) -> None:
        if logger.isEnabledFor(level):
            prefix = f"conn={self.session_id} user={self.user}" + (f" stream={stream}" if stream else "")
            logger.log(level, prefix + " " + message, *args)

    async def hello_frame(self) -> str:
        s = self.settings
        try:
            with anyio.fail_after(2):
                resumable = [{"id": m.id, "epoch": m.epoch} for m in await self.hub.store.resumable(self.user)]
        except Exception:  # the store is unreachable: the hello still goes out
            resumable = []
        return encode_hello(
            session=self.session_id,
            user=self.user,
            heartbeat_s=s.heartbeat_interval_s,
            limits={
                "max_message_bytes": s.max_message_bytes,
                "max_prompt_chars": s.max_prompt_chars,
                "max_tokens": s.max_tokens,
                "default_max_tokens": s.default_max_tokens,
                "max_streams_per_connection": s.max_streams_per_connection,
                "max_streams_per_user": s.max_streams_per_user,
                "generate_rate_per_s": s.user_generate_rate_per_s,
                "generate_burst": s.user_generate_burst,
            },
            resumable=resumable,
        )

    async def serve(self) -> None:
        """Run the connection until it closes, then close the socket. Never raises.

        The reader runs here, in the host task of the connection's task group, and ends
        when that group is cancelled: at once for an abrupt close, after the flush for a
        graceful one."""
        self._put_nowait(Frame(None, await self.hello_frame()))
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                self._start_writer()
                if self.closing:  # decided while the hello was being prepared
                    self._on_close_requested()
                    await anyio.sleep_forever()
                self.hub.watch(self, self.liveness.next_deadline())
                await self._reader()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("conn=%s user=%s internal error", self.session_id, self.user)
            self._request_close(CloseCode.INTERNAL, "internal error")
        finally:
            self._task_group = None
            self._report_sent()
            self.hub.unwatch(self)
            self._queue.close()
            self._drop_overflow()  # a producer waiting for it to drain finds the queue closed
            self._detach_all()
            with anyio.CancelScope(shield=True):
                await self._close_socket()
                await self._leave_all_rooms()

    def shut_down(self) -> None:
        """Called by the hub's drain: end remaining generations with ``shutting_down``, 1001."""
        self._request_close(
            CloseCode.GOING_AWAY,
            "server shutting down",
            graceful=True,
            generation_terminal=(ErrorCode.SHUTTING_DOWN, "the server is shutting down"),
        )

    def _request_close(
        self,
        code: int | None,
        reason: str = "",
        *,
        graceful: bool = False,
        generation_terminal: tuple[ErrorCode, str] | None = None,
        final_frames: tuple[str, ...] = (),
    ) -> None:
        """Decide how the connection ends; the first decision wins. ``code`` None means the
        client is gone and nothing more can be sent."""
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        self.close_reason = reason
        self._graceful = graceful and code is not None
        self._socket_gone = code is None
        self._generation_terminal = generation_terminal
        self._final_frames = final_frames
        self.hub.unwatch(self)
        if self._task_group is not None:
            self._on_close_requested()

    def _on_close_requested(self) -> None:
        task_group = self._task_group
        assert task_group is not None
        if self._graceful:
            task_group.start_soon(self._close_gracefully)
        else:
            task_group.cancel_scope.cancel()

    async def _close_gracefully(self) -> None:
        with anyio.move_on_after(GRACEFUL_FLUSH_TIMEOUT_S):
            await self._finish_gracefully()
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()

    async def _end_followed_generations(self) -> None:
        """Graceful close: each followed generation ends with the closing reason's terminal
        frame; those running on another process are only left (this socket stops following)."""
        terminal = self._generation_terminal
        local: list[Follow] = []
        for follow in list(self.follows.values()):
            stream_id = follow.generation.id if isinstance(follow, Follow) else follow.meta.id
            frame = encode_error(stream_id, terminal[0], terminal[1]) if terminal else None
            if isinstance(follow, Follow):
                local.append(follow)
                follow.generation.cancel(frame, str(terminal[0]) if terminal else "cancelled")
            else:
                follow.scope.cancel()
                if frame is not None:
                    await self._put(Frame(None, frame))
        for follow in local:
            await follow.ended.wait()

    async def _finish_gracefully(self) -> None:
        await self._end_followed_generations()
        for frame in self._final_frames:
            await self._put(Frame(None, frame))
        self._queue.close()
        self._start_writer()
        if self._writer_running:
            self._writer_exited = exited = anyio.Event()
            await exited.wait()

    async def _close_socket(self) -> None:
        code = self.close_code
        if code is None or self._socket_gone:
            return
        if code in (CloseCode.INTERNAL, CloseCode.GOING_AWAY, CloseCode.POLICY, CloseCode.TRY_AGAIN_LATER):
            self.hub.metrics.closes.labels(CloseCode(code).name.lower()).inc()
        if self._graceful or self.transport is None:
            with anyio.move_on_after(2.0) as scope:
                try:
                    await self.websocket.close(code, self.close_reason)
                except _SOCKET_GONE:
                    return
                except RuntimeError:
                    return
            if not scope.cancelled_caught:
                return
        if self.transport is not None:
            self.transport.force_close(code, self.close_reason)

    def _detach_all(self) -> None:
        """The socket is gone: stop following. A detached generation keeps running for the
        resume grace period (see ``Hub.generation_detached``)."""
        follows = list(self.follows.values())
        self.follows.clear()
        for follow in follows:
            if isinstance(follow, Follow):
                follow.generation.detach(follow)
            else:
                follow.scope.cancel()

    async def _leave_all_rooms(self) -> None:
        rooms = self.rooms
        if not rooms:
            return
        for room in list(rooms):
            rooms.discard(room)
            self.hub.room_left(room, self)
            with anyio.move_on_after(1.0):
                with contextlib.suppress(Exception):
                    await self._publish_presence(room, "leave")

    # Send queue -----------------------------------------------------------------------------

    async def put(self, item: OutItem) -> None:
        """A generation's producer puts its frames here (``Sink``).

        A paced token (an LLM's: tens of milliseconds apart) finds the queue empty and the
        socket writable; it is written right here, in the producer's task, which saves
        waking the writer task for every token. Tokens that follow each other closely
        (within ``DIRECT_WRITE_GAP_S``) are queued for the writer instead, which merges
        whatever waits into one frame: at full speed only the first token of a burst is
        written directly, and coalescing works as before. Order holds because a direct
        write happens only while nothing is queued and the writer is not writing. It waits
        while frames wait in the overflow: those are older and go out first."""
        while self._overflow:
            if self.closing:
                raise ClosedResourceError
            drained = self._overflow_drained
            assert drained is not None
            await drained.wait()
        transport = self.transport
        if transport is not None and self._writer_quiet() and not self.closing:
            now = anyio.current_time()
            if now - self._last_direct_write >= DIRECT_WRITE_GAP_S:
                self._last_direct_write = now
                if type(item) is Token:
                    if transport.send_texts([encode_token(item.stream.id_json, item.seq, item.text)]):
                        self._count_sent(1, 1, 0)
                        return
                elif transport.send_texts([encode_item(item)]):
                    self._count_sent(1, 0, 0)
                    return
        await self._put(item)

    def follow_ended(self, follow: Follow) -> None:
        # A follower still replaying is removed by its replay task once the backlog is out,
        # so a second resume of the same id cannot start meanwhile.
        if follow.live and self.follows.get(follow.generation.id) is follow:
            del self.follows[follow.generation.id]
            if not self.follows:
                self._report_sent()
                self._queue.nudge()  # a waiting writer with nothing left to follow may stop

    def push(self, frame: str, stream: StreamRef | None = None) -> None:
        """Deliver a frame that must not wait (a broadcast, room frames).

        A full send queue is the normal state while a generation outpaces the socket, so
        such frames wait in a bounded overflow that the writer sends after its current
        batch (keeping their order), and the slow-consumer clock runs meanwhile. Only an
        overflow that is full too closes the connection (4003) at once."""
        if self.closing:
            return
        # ``stream`` marks a generation's own frame, so coalescing never moves its tokens
        # across it.
        item = Frame(stream, frame)
        overflow = self._overflow
        if not overflow and self._put_nowait(item):
            return
        if overflow is None:
            overflow = self._overflow = deque()
            self._overflow_drained = anyio.Event()
        elif len(overflow) >= self.settings.send_queue_size:
            self._slow_consumer()
            return
        overflow.append(item)
        if self.liveness.queue_full(anyio.current_time()):
            self.hub.watch(self, self.liveness.next_deadline())

    def push_item(self, item: OutItem) -> None:
        """A generation's frame for a follower that must not hold the producer back."""
        self.push(encode_item(item), item.stream)

    def push_room(self, frames: list[Any]) -> None:
        """Room fan-out never blocks the producer (see ``push``)."""
        for frame in frames:
            if isinstance(frame, str):
                self.push(frame)

    def _slow_consumer(self) -> None:
        self._log(logging.INFO, "slow consumer: closing 4003")
        self.hub.metrics.closes.labels("slow_consumer").inc()
        self._request_close(CloseCode.SLOW_CONSUMER, "slow consumer")

    def _writer_quiet(self) -> bool:
        """Nothing is queued and the writer is not writing: a frame written to the socket
        now cannot overtake another."""
        return not self._queue.items and (self._writer_idle or not self._writer_running)

    def _put_nowait(self, item: OutItem) -> bool:
        queue = self._queue
        if (type(item) is Frame and self.transport is not None and self._task_group is not None
                and not queue.closed and self._writer_quiet() and self.transport.send_texts([item.text])):
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
            self._start_writer()
        return True

    async def _put(self, item: OutItem) -> None:
        queue = self._queue
        if not queue.put_nowait(item):
            if self.liveness.queue_full(anyio.current_time()):
                self.hub.watch(self, self.liveness.next_deadline())
            await queue.put(item)
        if not self._writer_running:
            self._start_writer()

    async def _send_error(self, stream_id: str | None, exc: GatewayError) -> None:
        self.hub.metrics.errors.labels(str(exc.code)).inc()
        with contextlib.suppress(ClosedResourceError, anyio.BrokenResourceError):
            await self._put(Frame(None, encode_exception(stream_id, exc)))

    # Tasks --------------------------------------------------------------------------------

    def _start_writer(self) -> None:
        if not self._writer_running and self._task_group is not None and (self._queue.items or self._queue.closed):
            self._writer_running = True
            self._task_group.start_soon(self._writer)

    async def _writer(self) -> None:
        """Writes whatever is queued, merged per stream. It runs while frames are queued or
        while the connection follows a generation, and stops when neither holds; the next
        frame queued starts it again. While it waits, a frame put into an empty queue may
        be written by whoever puts it (``put``, ``_put_nowait``)."""
        queue = self._queue
        send = self.websocket.send
        transport = self.transport
        liveness = self.liveness
        try:
            while True:
                if not queue.items:
                    if queue.closed or not self.follows:
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
                    while overflow:
                        await send({"type": "websocket.send", "text": overflow.popleft().text})
                        sent += 1
                    self._drop_overflow()
                self._count_sent(sent, tokens, merged)
        except _SOCKET_GONE:
            self._request_close(None)
        finally:
            self._report_sent()
            self._writer_running = False
            if self._writer_exited is not None:
                self._writer_exited.set()

    def _drop_overflow(self) -> None:
        self._overflow = None
        drained = self._overflow_drained
        if drained is not None:
            self._overflow_drained = None
            drained.set()

    def _count_sent(self, frames: int, tokens: int, merged: int) -> None:
        # Added to the metrics in batches: a paced stream sends one frame per wake-up,
        # and three locked counter increments per frame were a measurable share of it.
        self._sent_frames += frames
        self._sent_tokens += tokens
        self._sent_merged += merged
        if self._sent_frames >= METRICS_EVERY_FRAMES:
            self._report_sent()

    def _report_sent(self) -> None:
        frames = self._sent_frames
        if not frames:
            return
        tokens = self._sent_tokens
        merged = self._sent_merged
        self._sent_frames = self._sent_tokens = self._sent_merged = 0
        metrics = self.hub.metrics
        metrics.frames_sent.inc(frames)
        if tokens:
            metrics.tokens_sent.inc(tokens)
        if merged:
            metrics.coalesced_tokens.inc(merged)

    async def _reader(self) -> None:
        receive = self.websocket.receive
        liveness = self.liveness
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    code = message.get("code", 1005)
                    if code == CloseCode.TOO_BIG:
                        self.hub.metrics.closes.labels("too_big").inc()
                    self._request_close(None)
                    return
                liveness.inbound(anyio.current_time())
                text = message.get("text")
                if text is None:
                    await self._send_error(
                        None,
                        GatewayError(
                            "binary frames are not supported; send JSON text frames", code=ErrorCode.BAD_REQUEST
                        ),
                    )
                    continue
                if text == PONG_FRAME:  # the answer to a heartbeat: a sign of life, nothing to do
                    continue
                if self.closing:
                    continue  # closing: nothing new is served, and the send queue may be closed
                try:
                    await self._handle_text(text)
                except ClosedResourceError:
                    continue
        except _SOCKET_GONE:
            self._request_close(None)

    async def _handle_text(self, text: str) -> None:
        try:
            message = parse_client_frame(text)
        except FrameError as exc:
            await self._send_error(exc.stream_id, exc)
            return
        try:
            if isinstance(message, GenerateMessage):
                await self._start_generation(message)
            elif isinstance(message, CancelMessage):
                await self._cancel(message.id)
            elif isinstance(message, ResumeMessage):
                await self._resume(message.id, message.after)
            elif isinstance(message, JoinMessage):
                await self._join(message.room)
            elif isinstance(message, LeaveMessage):
                await self._leave(message.room)
            elif isinstance(message, PingMessage):
                await self._put(Frame(None, PONG_FRAME))
            elif isinstance(message, AuthMessage):
                raise GatewayError("already authenticated", code=ErrorCode.BAD_REQUEST)
        except GatewayError as exc:
            await self._send_error(getattr(message, "id", None), exc)

    def on_deadline(self, now: float) -> float | None:
        """Called by the hub's timer when ``liveness.next_deadline()`` has passed; returns
        the next deadline, or None when the connection is closing."""
        if self.closing:
            return None
        liveness = self.liveness
        if self.transport is not None:
            liveness.inbound(self.transport.last_inbound)
        for due in liveness.poll(now):
            if due is Due.SLOW_CONSUMER:
                self._slow_consumer()
                return None
            if due is Due.STALE:
                self._log(logging.INFO, "no sign of life for %.0fs: closing 4000", self.settings.heartbeat_timeout_s)
                self.hub.metrics.closes.labels("stale").inc()
                self._request_close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                return None
            if due is Due.TOKEN_EXPIRED:
                self._log(logging.INFO, "token expired: closing 1008")
                self.hub.metrics.closes.labels("token_expired").inc()
                message = "the access token has expired; reconnect with a new one"
                self._request_close(
                    CloseCode.POLICY,
                    "token expired",
                    graceful=True,
                    generation_terminal=(ErrorCode.TOKEN_EXPIRED, message),
                    final_frames=(encode_error(None, ErrorCode.TOKEN_EXPIRED, message),),
                )
                return None
            if due is Due.SEND_PING:
                # A full queue means the connection is busy, and a ping would only wait.
                self._put_nowait(Frame(None, PING_FRAME))
        return liveness.next_deadline()

    # Generations ------------------------------------------------------------------------

    async def _start_generation(self, message: GenerateMessage) -> None:
        """Admit a generate or raise the error that refuses it."""
        settings = self.settings
        hub = self.hub
        if message.prompt_chars() > settings.max_prompt_chars:
            raise GatewayError(f"the prompt is longer than {settings.max_prompt_chars} characters",
                               code=ErrorCode.PROMPT_TOO_LONG)
        if message.max_tokens is not None and message.max_tokens > settings.max_tokens:
            raise GatewayError(f"max_tokens must be at most {settings.max_tokens}", code=ErrorCode.BAD_REQUEST)
        if message.room is not None and (self.rooms is None or message.room not in self.rooms):
            raise GatewayError("join the room before generating in it", code=ErrorCode.FORBIDDEN)
        stream_id = message.id or new_stream_id()
        if stream_id in self.follows or (self.user, stream_id) in hub.generations:
            raise GatewayError("a generation with this id is already running", code=ErrorCode.DUPLICATE_ID)
        if hub.draining or self.closing:
            raise GatewayError("the server is shutting down", code=ErrorCode.SHUTTING_DOWN)
        if message.room is None and len(self.follows) >= settings.max_streams_per_connection:
            raise GatewayError(f"at most {settings.max_streams_per_connection} generations per connection",
                               code=ErrorCode.TOO_MANY_STREAMS)
        accepted_at = anyio.current_time()
        lease = await hub.limits.acquire_generation(self.user)
        meta = StreamMeta(user=self.user, id=stream_id, epoch=new_epoch(), node=hub.node_id,
                          created_at=time.time(), room=message.room)
        # From here until the hub owns the generation nothing may leak the lease: no await
        # follows the store's create.
        try:
            created = await hub.store.create(meta)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await lease.release()
            if not isinstance(exc, Exception):
                raise
            logger.warning("conn=%s stream=%s stream store create failed: %s", self.session_id, stream_id,
                           type(exc).__name__)
            raise GatewayError("the stream store is unavailable; try again", code=ErrorCode.INTERNAL) from None
        if not created:
            await lease.release()
            raise GatewayError("this id was used recently; pick another or resume it", code=ErrorCode.DUPLICATE_ID)
        stop = message.stop
        request = GenerationRequest(
            id=stream_id,
            user=self.user,
            max_tokens=message.max_tokens or settings.default_max_tokens,
            prompt=message.prompt,
            messages=tuple(ChatTurn(m.role, m.content) for m in message.messages or ()),
            temperature=message.temperature,
            top_p=message.top_p,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            model=message.model,
        )
        generation = Generation(hub, meta, request, lease, accepted_at)
        if message.room is None:
            # The generation sends its own start frame first (see Generation._produce).
            self.follows[stream_id] = generation.follow(self)
        self._log(logging.DEBUG, "generation started", stream=stream_id)
        hub.start_generation(generation)

    async def _cancel(self, stream_id: str) -> None:
        hub = self.hub
        follow = self.follows.get(stream_id)
        if isinstance(follow, Follow):
            follow.generation.cancel(None, "cancelled")
            return
        generation = hub.generations.get((self.user, stream_id))
        if generation is not None:
            generation.cancel(None, "cancelled")
            if follow is None:
                self._spawn_cancel_answer(stream_id, self._send_terminal_when_finished, generation)
            return
        meta = await self._stored_meta(stream_id)
        if meta is None:
            raise GatewayError("no generation with this id", code=ErrorCode.NOT_FOUND)
        await self._publish({"op": "cancel", "user": self.user, "id": stream_id})
        if follow is None:
            # Not following it here: answer with its terminal frame when it comes.
            self._spawn_cancel_answer(stream_id, self._follow_store, meta, 1 << 62, False)

    def _spawn_cancel_answer(self, stream_id: str, func: Any, *args: Any) -> None:
        """At most one pending answer per id, and no more than the stream limit in all."""
        answers = self._cancel_answers
        if answers is None:
            answers = self._cancel_answers = set()
        if stream_id in answers:
            return
        if len(answers) >= self.settings.max_streams_per_connection:
            raise GatewayError("too many cancels awaiting their answer", code=ErrorCode.TOO_MANY_STREAMS)
        answers.add(stream_id)

        async def answer() -> None:
            try:
                await func(*args)
            finally:
                answers.discard(stream_id)

        self._spawn(answer)

    async def _stored_meta(self, stream_id: str) -> StreamMeta | None:
        try:
            return await self.hub.store.get(self.user, stream_id)
        except Exception:
            raise GatewayError("the stream store is unreachable right now; try again",
                               code=ErrorCode.INTERNAL) from None

    async def _send_terminal_when_finished(self, generation: Generation) -> None:
        await generation.finished.wait()
        if generation.terminal is not None:
            await self._put(Frame(None, generation.terminal))

    async def _resume(self, stream_id: str, after: int) -> None:
        hub = self.hub
        if stream_id in self.follows:
            raise GatewayError("this connection already follows that generation", code=ErrorCode.DUPLICATE_ID)
        generation = hub.generations.get((self.user, stream_id))
        if generation is not None and generation.terminal is None:
            follow, replay, first = generation.attach_for_resume(self, after)
            self.follows[stream_id] = follow
            self._spawn(self._replay_local, follow, replay, first)
            return
        meta = await self._stored_meta(stream_id)
        if meta is None:
            raise GatewayError("no generation with this id", code=ErrorCode.NOT_FOUND)
        remote = RemoteFollow(meta)
        self.follows[stream_id] = remote
        self._spawn(self._follow_store, meta, after, True, remote)

    async def _replay_local(self, follow: Follow, replay: list[str], first: int) -> None:
        generation = follow.generation
        ref = generation.ref
        await self._put(Frame(ref, generation.start_frame(resumed=True)))
        for offset, text in enumerate(replay):
            await self._put(Token(ref, first + offset, text))
        # Hand over to live delivery: drain what arrived meanwhile, then switch with no
        # await between the last emptiness check and ``live = True``.
        while follow.backlog:
            waiting, follow.backlog = follow.backlog, []
            for item in waiting:
                await self._put(item)
        follow.live = True
        if follow.ended.is_set():
            self.follow_ended(follow)

    async def _follow_store(self, meta: StreamMeta, after: int, announce: bool,
                            remote: RemoteFollow | None = None) -> None:
        """Relay a stored generation: replay after ``after``, the live tail, the terminal.
        With ``announce`` False only the terminal frame is relayed (a cancel's answer)."""
        ref = StreamRef.of(meta.id)
        scope = remote.scope if remote is not None else anyio.CancelScope()
        try:
            with scope:
                async with anyio.create_task_group() as tg:
                    if announce:
                        tg.start_soon(self._announce_follow, meta)
                        await self._put(Frame(ref, encode_start(meta.id, meta.epoch, resumed=True, room=meta.room)))
                    async for event in self.hub.store.follow(meta, after):
                        if isinstance(event, TokenBatch):
                            for offset, text in enumerate(event.texts):
                                await self._put(Token(ref, event.first_seq + offset, text))
                        else:
                            await self._put(Frame(ref, event.frame))
                            break
                    tg.cancel_scope.cancel()
        finally:
            if remote is not None and self.follows.get(meta.id) is remote:
                del self.follows[meta.id]

    async def _announce_follow(self, meta: StreamMeta) -> None:
        """Tell the producing process, periodically, that this generation is followed."""
        interval = max(self.settings.resume_grace_s * FOLLOW_NOTICE_FRACTION, 0.5)
        while True:
            with contextlib.suppress(Exception):
                await self.hub.publish({"op": "follow", "user": meta.user, "id": meta.id})
            await anyio.sleep(interval)

    # Rooms --------------------------------------------------------------------------------

    def _room_allowed(self, room: str) -> bool:
        claim = self._rooms_claim
        if claim == "*" or (isinstance(claim, list) and "*" in claim):
            return True
        return isinstance(claim, list) and room in claim

    async def _join(self, room: str) -> None:
        if not self._room_allowed(room):
            raise GatewayError("not allowed to join this room", code=ErrorCode.FORBIDDEN)
        rooms = self.rooms
        if rooms is None:
            rooms = self.rooms = set()
        if room in rooms:
            return
        if len(rooms) >= self.settings.max_rooms_per_connection:
            raise GatewayError(f"at most {self.settings.max_rooms_per_connection} rooms per connection",
                               code=ErrorCode.BAD_REQUEST)
        rooms.add(room)
        self.hub.room_joined(room, self)
        await self._put(Frame(None, encode_room_ack("joined", room)))
        await self._publish_presence(room, "join")

    async def _leave(self, room: str) -> None:
        if self.rooms is None or room not in self.rooms:
            raise GatewayError("not in this room", code=ErrorCode.NOT_FOUND)
        self.rooms.discard(room)
        self.hub.room_left(room, self)
        await self._put(Frame(None, encode_room_ack("left", room)))
        await self._publish_presence(room, "leave")

    async def _publish_presence(self, room: str, event: str) -> None:
        await self._publish({"op": "room", "room": room, "origin": self.session_id,
                             "frames": [encode_presence(room, self.user, event)]})

    async def _publish(self, message: dict[str, Any]) -> None:
        try:
            await self.hub.publish(message)
        except Exception:
            raise GatewayError("the cluster is unreachable right now; try again",
                               code=ErrorCode.INTERNAL) from None

    def _spawn(self, func: Any, *args: Any) -> None:
        """A helper task in the connection's task group. A send queue closed under it (the
        connection is closing) ends it quietly rather than failing the connection."""
        assert self._task_group is not None

        async def run() -> None:
            with contextlib.suppress(ClosedResourceError):
                await func(*args)

        self._task_group.start_soon(run)
