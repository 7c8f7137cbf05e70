"""One authenticated WebSocket connection: its lifecycle, the reader and the dispatch of
inbound frames. It carries out what its state machine (``gateway.core.state``) decides;
the send path is its ``Outbox``, its generations are ``Streams``, its rooms ``Rooms``.

Ownership:
- ``serve`` owns the connection's task group: the reader runs in its host task, the
  outbox's writer and the helper tasks (replays, store relays) in the group. Deadlines
  (heartbeat pings, staleness, slow consumer, token expiry) live in the hub's timer,
  which calls ``on_deadline``.
- Whatever decides the connection must end calls ``close`` once (the first decision
  wins); ``serve`` then finishes gracefully (generations get their terminal frames, the
  queue is flushed, then the close frame) or abruptly (everything is cancelled and the
  socket is closed without waiting for a client that may not be reading).
- Every generation ends with exactly one terminal frame unless the socket is already gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from typing import Any

import anyio
import anyio.abc
from anyio import ClosedResourceError
from starlette.websockets import WebSocket

from gateway.auth import Principal
from gateway.core.liveness import Liveness
from gateway.core.ports import TRANSPORT_EXTENSION, Transport
from gateway.core.state import (
    COUNTED_AT_CLOSE,
    FLOOD,
    INTERNAL_ERROR,
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    SOCKET_GONE,
    CloseDecision,
    ConnectionState,
    FrameVerdict,
)
from gateway.generation import Follow
from gateway.hub import Hub
from gateway.outbox import SOCKET_ERRORS, Outbox
from gateway.rooms import Rooms
from gateway.streams import Streams
from gateway.wire.coalesce import Frame, OutItem
from gateway.wire.codes import CloseCode, ErrorCode
from gateway.wire.errors import BadRequest, FrameError, GatewayError, RateLimited
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
from gateway.wire.outbound import PING_FRAME, PONG_FRAME, encode_exception, encode_failure, encode_hello

logger = logging.getLogger("gateway.connection")

# How long a graceful close may take to flush terminal frames before it turns abrupt.
GRACEFUL_FLUSH_TIMEOUT_S = 5.0


class Connection:
    """What one connection holds while it is idle is kept small on purpose (a process may
    hold tens of thousands): its deadlines live in the hub's timer, its writer task runs
    only while there is something to write or a generation to follow, and the reader runs
    in the task that serves the connection."""

    __slots__ = (
        "_rooms",
        "_rooms_claim",
        "_task_group",
        "hub",
        "outbox",
        "session_id",
        "settings",
        "state",
        "streams",
        "transport",
        "user",
        "websocket",
    )

    def __init__(self, hub: Hub, websocket: WebSocket, principal: Principal, session_id: str) -> None:
        self.hub = hub
        settings = self.settings = hub.settings
        self.websocket = websocket
        self.user = principal.user
        self.session_id = session_id
        transport = websocket.scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
        self.transport: Transport | None = transport
        # The one claim consulted after the handshake; the principal and its other claims
        # are not kept for as long as the connection is open.
        self._rooms_claim = principal.claims.get(settings.rooms_claim)
        now = anyio.current_time()
        expires_at = None
        if principal.expires_at is not None:
            expires_at = now + (principal.expires_at + settings.jwt_leeway_s - time.time())
        liveness = Liveness(
            now=now,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
            slow_consumer_timeout_s=settings.slow_consumer_timeout_s,
            token_expires_at=expires_at,
        )
        self.state = ConnectionState(settings, liveness)
        self.outbox = Outbox(self, settings.send_queue_size, websocket.send, self.transport, liveness, hub.metrics)
        self.streams = Streams(self)
        self._rooms: Rooms | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    # What the outbox, the streams and the hub need of the connection ----------------------

    @property
    def closing(self) -> bool:
        return self.state.closing

    @property
    def running(self) -> bool:
        return self._task_group is not None

    @property
    def following(self) -> bool:
        return bool(self.streams.follows)

    @property
    def joined_rooms(self) -> set[str] | None:
        return self._rooms.joined if self._rooms is not None else None

    def start_task(self, func: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        if self._task_group is None:
            return False
        self._task_group.start_soon(func)
        return True

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """A helper task in the connection's task group. A send queue closed under it (the
        connection is closing) ends it quietly rather than failing the connection."""
        assert self._task_group is not None

        async def run() -> None:
            with suppress(ClosedResourceError):
                await func(*args)

        self._task_group.start_soon(run)

    def log(self, level: int, message: str, *args: Any, stream: str | None = None) -> None:
        if logger.isEnabledFor(level):
            prefix = f"conn={self.session_id} user={self.user}" + (f" stream={stream}" if stream else "")
            logger.log(level, prefix + " " + message, *args)

    def send_urgent(self, item: OutItem) -> None:
        self.outbox.send_urgent(item)

    def send_droppable(self, item: OutItem) -> bool:
        return self.outbox.send_droppable(item)

    def follow_ended(self, follow: Follow) -> None:
        self.streams.follow_ended(follow)

    def slow_consumer_clock_started(self) -> None:
        self.hub.watch(self, self.state.liveness.next_deadline())

    def slow_consumer(self) -> None:
        self.close(SLOW_CONSUMER)

    def socket_gone(self) -> None:
        self.close(SOCKET_GONE)

    # Lifecycle ----------------------------------------------------------------------------

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
            routes=list(s.routes.routes) if s.routes is not None else None,
        )

    async def serve(self) -> None:
        """Run the connection until it closes, then close the socket. Never raises.

        The reader runs here, in the host task of the connection's task group, and ends
        when that group is cancelled: at once for an abrupt close, after the flush for a
        graceful one."""
        self.outbox.offer(Frame(None, await self.hello_frame()))
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                self.outbox.start_writer()
                if self.state.closing:  # decided while the hello was being prepared
                    self._carry_out_close()
                    await anyio.sleep_forever()
                self.hub.watch(self, self.state.liveness.next_deadline())
                await self._reader()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("conn=%s user=%s internal error", self.session_id, self.user)
            self.close(INTERNAL_ERROR)
        finally:
            self._task_group = None
            self.hub.unwatch(self)
            self.outbox.close()
            self.streams.detach_all()
            with anyio.CancelScope(shield=True):
                await self._close_socket()
                if self._rooms is not None:
                    await self._rooms.leave_all()
            # The outbox, the streams and the rooms each point back at this connection,
            # and nothing calls into them once it has served. Letting go here means
            # reference counting frees the whole connection now, not the next full
            # collection (once a minute): a burst of connections would hold its memory
            # that long and leave the heap fragmented.
            self.outbox.release()
            self.streams.host = None  # type: ignore[assignment]
            self._rooms = None

    def shut_down(self) -> None:
        """Called by the hub's drain: end remaining generations with ``shutting_down``, 1001."""
        self.close(SHUTTING_DOWN)

    def close(self, decision: CloseDecision) -> None:
        """Decide how the connection ends; the first decision wins."""
        if not self.state.decide_close(decision):
            return
        if decision.metric is not None:
            self.log(logging.INFO, "closing %s: %s", decision.code, decision.reason)
            self.hub.metrics.closes.labels(decision.metric).inc()
        self.hub.unwatch(self)
        if self._task_group is not None:
            self._carry_out_close()

    def _carry_out_close(self) -> None:
        task_group = self._task_group
        decision = self.state.decision
        assert task_group is not None and decision is not None
        if decision.graceful and decision.code is not None:
            task_group.start_soon(self._close_gracefully, decision)
        else:
            task_group.cancel_scope.cancel()

    async def _close_gracefully(self, decision: CloseDecision) -> None:
        with anyio.move_on_after(GRACEFUL_FLUSH_TIMEOUT_S):
            if not decision.keep_generations:
                await self.streams.end_all(decision.terminal)
            for failed in decision.final:
                await self.outbox.send_queued(Frame(None, encode_failure(None, failed)))
            await self.outbox.close_and_flush()
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()

    async def _close_socket(self) -> None:
        decision = self.state.decision or SOCKET_GONE
        self.state.socket_closed()
        code = decision.code
        if code is None:
            return
        if code in COUNTED_AT_CLOSE:
            self.hub.metrics.closes.labels(CloseCode(code).name.lower()).inc()
        transport = self.transport
        if decision.graceful or decision.handshake or transport is None:
            with anyio.move_on_after(2.0) as scope:
                try:
                    await self.websocket.close(code, decision.reason)
                except (*SOCKET_ERRORS, RuntimeError):
                    return
            if not scope.cancelled_caught:
                return
        if transport is not None:
            transport.force_close(code, decision.reason)

    # Inbound ------------------------------------------------------------------------------

    async def _reader(self) -> None:
        receive = self.websocket.receive
        liveness = self.state.liveness
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    if message.get("code", 1005) == CloseCode.TOO_BIG:
                        self.hub.metrics.closes.labels("too_big").inc()
                    self.close(SOCKET_GONE)
                    return
                now = anyio.current_time()
                liveness.inbound(now)
                text = message.get("text")
                if text == PONG_FRAME:  # the answer to a heartbeat: a sign of life, nothing to do
                    continue
                verdict, retry_after = self.state.admit_frame(now)
                if verdict is not FrameVerdict.ACCEPT:
                    self.hub.metrics.frames_rate_limited.inc()
                    if verdict is FrameVerdict.TELL:
                        await self._send_error(None, RateLimited("too many frames; slow down",
                                                                 retry_after_s=retry_after))
                    elif verdict is FrameVerdict.FLOOD:
                        self.close(FLOOD)
                    continue
                if text is None:
                    await self._send_error(None, BadRequest("binary frames are not supported; send JSON text frames"))
                    continue
                if self.state.closing:
                    continue  # closing: nothing new is served, and the send queue may be closed
                try:
                    await self._handle_text(text)
                except ClosedResourceError:
                    continue
        except SOCKET_ERRORS:
            self.close(SOCKET_GONE)

    async def _handle_text(self, text: str) -> None:
        try:
            message = parse_client_frame(text)
        except FrameError as exc:
            await self._send_error(exc.stream_id, exc)
            return
        try:
            if isinstance(message, GenerateMessage):
                await self.streams.start(message)
            elif isinstance(message, CancelMessage):
                await self.streams.cancel(message.id)
            elif isinstance(message, ResumeMessage):
                await self.streams.resume(message.id, message.after)
            elif isinstance(message, JoinMessage):
                if self._rooms is None:
                    self._rooms = Rooms(self, self._rooms_claim)
                await self._rooms.join(message.room)
            elif isinstance(message, LeaveMessage):
                if self._rooms is None:
                    raise GatewayError("not in this room", code=ErrorCode.NOT_FOUND)
                await self._rooms.leave(message.room)
            elif isinstance(message, PingMessage):
                await self.outbox.send_queued(Frame(None, PONG_FRAME))
            elif isinstance(message, AuthMessage):
                raise BadRequest("already authenticated")
        except GatewayError as exc:
            await self._send_error(getattr(message, "id", None), exc)

    async def _send_error(self, stream_id: str | None, exc: GatewayError) -> None:
        self.hub.metrics.errors.labels(str(exc.code)).inc()
        with suppress(ClosedResourceError, anyio.BrokenResourceError):
            await self.outbox.send_queued(Frame(None, encode_exception(stream_id, exc)))

    def on_deadline(self, now: float) -> float | None:
        """Called by the hub's timer when the connection's next deadline has passed."""
        transport = self.transport
        outcome = self.state.on_deadline(now, transport.last_inbound if transport is not None else None)
        if outcome.close is not None:
            self.close(outcome.close)
            return None
        if outcome.ping:
            # A full queue means the connection is busy, and a ping would only wait.
            self.outbox.offer(Frame(None, PING_FRAME))
        return outcome.next_deadline

