"""One authenticated WebSocket connection: reader, writer, timer and its generations.

All of them run in one task group owned by ``Connection.serve``. Ownership rules:

- Only the writer task writes frames to the socket, in queue order. Everything else puts
  items into the bounded send queue; a producer that finds it full waits, which pauses its
  backend (backpressure).
- Whatever decides the connection must end calls ``_request_close`` once; ``serve`` then
  either finishes gracefully (generations get their terminal frames, the queue is flushed,
  then the close frame) or abruptly (everything is cancelled and the socket is closed
  without waiting for a client that may not be reading).
- Every generation ends with exactly one terminal frame unless the socket is already gone.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio import ClosedResourceError, EndOfStream, WouldBlock
from starlette import websockets as starlette_websockets
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.auth import Principal
from gateway.backends import ChatTurn, FinishChunk, GenerationRequest, TokenChunk
from gateway.errors import CloseCode, ErrorCode, GatewayError
from gateway.hub import Hub
from gateway.liveness import Due, Liveness
from gateway.protocol import (
    PING_FRAME,
    PONG_FRAME,
    AuthMessage,
    CancelMessage,
    Frame,
    FrameError,
    GenerateMessage,
    OutItem,
    PingMessage,
    PongMessage,
    StreamRef,
    Token,
    coalesce,
    encode_done,
    encode_error,
    encode_gateway_error,
    encode_hello,
    encode_start,
    parse_client_frame,
)
from gateway.server import TRANSPORT_EXTENSION, TransportControl

logger = logging.getLogger("gateway.connection")

_WebSocketDisconnected: type[Exception] = getattr(starlette_websockets, "WebSocketDisconnected", RuntimeError)
_SOCKET_GONE = (WebSocketDisconnect, _WebSocketDisconnected, OSError)

# How long a backend iterator gets to run its cleanup after the gateway stops it.
ACLOSE_TIMEOUT_S = 2.0
# How long a graceful close may take to flush terminal frames before it turns abrupt.
GRACEFUL_FLUSH_TIMEOUT_S = 5.0


def new_stream_id() -> str:
    return "g-" + secrets.token_hex(8)


@dataclass(eq=False)
class Generation:
    request: GenerationRequest
    ref: StreamRef
    accepted_at: float
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    finished: anyio.Event = field(default_factory=anyio.Event)
    cancel_frame: str | None = None
    cancel_outcome: str = "cancelled"

    @property
    def id(self) -> str:
        return self.request.id

    def cancel(self, frame: str | None, outcome: str) -> None:
        """Stop the generation; ``frame`` (or nothing) becomes its terminal frame."""
        if self.scope.cancel_called:
            return
        self.cancel_frame = frame
        self.cancel_outcome = outcome
        self.scope.cancel()


class Connection:
    def __init__(self, hub: Hub, websocket: WebSocket, principal: Principal, session_id: str) -> None:
        self.hub = hub
        self.settings = hub.settings
        self.websocket = websocket
        self.principal = principal
        self.user = principal.user
        self.session_id = session_id
        transport = websocket.scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
        self.transport: TransportControl | None = transport if isinstance(transport, TransportControl) else None
        settings = self.settings
        self._send_queue, self._receive_queue = anyio.create_memory_object_stream[OutItem](settings.send_queue_size)
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
        self.generations: dict[str, Generation] = {}
        self._wake_timer = anyio.Event()
        self._closing = anyio.Event()
        self._writer_done = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._graceful = False
        self._generation_terminal: tuple[ErrorCode, str] | None = None
        self._final_frames: list[str] = []
        self._socket_gone = False

    # Lifecycle ------------------------------------------------------------------------------

    def _log(self, level: int, message: str, *args: Any, stream: str | None = None) -> None:
        if logger.isEnabledFor(level):
            prefix = f"conn={self.session_id} user={self.user}" + (f" stream={stream}" if stream else "")
            logger.log(level, prefix + " " + message, *args)

    def hello_frame(self) -> str:
        s = self.settings
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
        )

    async def serve(self) -> None:
        """Run the connection until it closes, then close the socket. Never raises."""
        self._put_nowait(Frame(None, self.hello_frame()))
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._writer)
                tg.start_soon(self._timer)
                tg.start_soon(self._reader)
                await self._closing.wait()
                if self._graceful:
                    with anyio.move_on_after(GRACEFUL_FLUSH_TIMEOUT_S):
                        await self._finish_gracefully()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("conn=%s user=%s internal error", self.session_id, self.user)
            self._request_close(CloseCode.INTERNAL, "internal error")
        finally:
            self._send_queue.close()
            self._receive_queue.close()
            with anyio.CancelScope(shield=True):
                await self._close_socket()

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
        if self._closing.is_set():
            return
        self.close_code = code
        self.close_reason = reason
        self._graceful = graceful and code is not None
        self._socket_gone = code is None
        self._generation_terminal = generation_terminal
        self._final_frames = list(final_frames)
        self._closing.set()

    async def _finish_gracefully(self) -> None:
        terminal = self._generation_terminal
        for generation in list(self.generations.values()):
            frame = encode_error(generation.id, terminal[0], terminal[1]) if terminal else None
            generation.cancel(frame, str(terminal[0]) if terminal else "cancelled")
        for generation in list(self.generations.values()):
            await generation.finished.wait()
        for frame in self._final_frames:
            await self._put(Frame(None, frame))
        self._send_queue.close()
        await self._writer_done.wait()

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

    # Send queue -----------------------------------------------------------------------------

    def _put_nowait(self, item: OutItem) -> bool:
        try:
            self._send_queue.send_nowait(item)
            return True
        except (WouldBlock, ClosedResourceError, anyio.BrokenResourceError):
            return False

    async def _put(self, item: OutItem) -> None:
        try:
            self._send_queue.send_nowait(item)
            return
        except WouldBlock:
            pass
        if self.liveness.queue_full(anyio.current_time()):
            self._wake_timer.set()
        await self._send_queue.send(item)

    async def _send_error(self, stream_id: str | None, exc: GatewayError) -> None:
        self.hub.metrics.errors.labels(str(exc.code)).inc()
        with contextlib.suppress(ClosedResourceError, anyio.BrokenResourceError):
            await self._put(Frame(None, encode_gateway_error(stream_id, exc)))

    # Tasks --------------------------------------------------------------------------------

    async def _writer(self) -> None:
        receive = self._receive_queue
        send = self.websocket.send
        metrics = self.hub.metrics
        batch_limit = self.settings.send_queue_size
        try:
            while True:
                try:
                    first = await receive.receive()
                except EndOfStream:
                    return
                batch = [first]
                while len(batch) < batch_limit:
                    try:
                        batch.append(receive.receive_nowait())
                    except (WouldBlock, EndOfStream):
                        break
                if self.liveness.queue_full_since is not None:
                    self.liveness.queue_drained()
                frames, tokens, merged = coalesce(batch)
                for text in frames:
                    await send({"type": "websocket.send", "text": text})
                metrics.frames_sent.inc(len(frames))
                if tokens:
                    metrics.tokens_sent.inc(tokens)
                    if merged:
                        metrics.coalesced_tokens.inc(merged)
        except _SOCKET_GONE:
            self._request_close(None)
        finally:
            self._writer_done.set()

    async def _reader(self) -> None:
        receive = self.websocket.receive
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    code = message.get("code", 1005)
                    if code == CloseCode.TOO_BIG:
                        self.hub.metrics.closes.labels("too_big").inc()
                    self._request_close(None)
                    return
                self.liveness.inbound(anyio.current_time())
                text = message.get("text")
                if text is None:
                    await self._send_error(
                        None,
                        GatewayError(
                            "binary frames are not supported; send JSON text frames", code=ErrorCode.BAD_REQUEST
                        ),
                    )
                    continue
                await self._handle_text(text)
        except _SOCKET_GONE:
            self._request_close(None)

    async def _handle_text(self, text: str) -> None:
        try:
            message = parse_client_frame(text)
        except FrameError as exc:
            await self._send_error(exc.stream_id, exc)
            return
        if isinstance(message, GenerateMessage):
            try:
                self._start_generation(message)
            except GatewayError as exc:
                await self._send_error(message.id, exc)
        elif isinstance(message, CancelMessage):
            generation = self.generations.get(message.id)
            if generation is None:
                await self._send_error(
                    message.id, GatewayError("no running generation with this id", code=ErrorCode.NOT_FOUND)
                )
                return
            generation.cancel(None, "cancelled")
        elif isinstance(message, PingMessage):
            await self._put(Frame(None, PONG_FRAME))
        elif isinstance(message, PongMessage):
            pass
        elif isinstance(message, AuthMessage):
            await self._send_error(None, GatewayError("already authenticated", code=ErrorCode.BAD_REQUEST))

    async def _timer(self) -> None:
        liveness = self.liveness
        while True:
            if self.transport is not None:
                liveness.inbound(self.transport.last_inbound)
            now = anyio.current_time()
            for due in liveness.poll(now):
                if due is Due.SLOW_CONSUMER:
                    self._log(logging.INFO, "slow consumer: closing 4003")
                    self.hub.metrics.closes.labels("slow_consumer").inc()
                    self._request_close(CloseCode.SLOW_CONSUMER, "slow consumer")
                    return
                if due is Due.STALE:
                    self._log(
                        logging.INFO, "no sign of life for %.0fs: closing 4000", self.settings.heartbeat_timeout_s
                    )
                    self.hub.metrics.closes.labels("stale").inc()
                    self._request_close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                    return
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
                    return
                if due is Due.SEND_PING:
                    # A full queue means the connection is busy, and a ping would only wait.
                    self._put_nowait(Frame(None, PING_FRAME))
            delay = liveness.next_deadline() - anyio.current_time()
            with anyio.move_on_after(max(delay, 0.0)):
                await self._wake_timer.wait()
            if self._wake_timer.is_set():
                self._wake_timer = anyio.Event()

    # Generations ------------------------------------------------------------------------

    def _start_generation(self, message: GenerateMessage) -> None:
        """Admit a generate or raise the error that refuses it."""
        settings = self.settings
        if message.prompt_chars() > settings.max_prompt_chars:
            raise GatewayError(
                f"the prompt is longer than {settings.max_prompt_chars} characters", code=ErrorCode.PROMPT_TOO_LONG
            )
        if message.max_tokens is not None and message.max_tokens > settings.max_tokens:
            raise GatewayError(f"max_tokens must be at most {settings.max_tokens}", code=ErrorCode.BAD_REQUEST)
        stream_id = message.id or new_stream_id()
        if stream_id in self.generations:
            raise GatewayError("a generation with this id is already running", code=ErrorCode.DUPLICATE_ID)
        if self.hub.draining or self._closing.is_set():
            raise GatewayError("the server is shutting down", code=ErrorCode.SHUTTING_DOWN)
        if len(self.generations) >= settings.max_streams_per_connection:
            raise GatewayError(
                f"at most {settings.max_streams_per_connection} generations per connection",
                code=ErrorCode.TOO_MANY_STREAMS,
            )
        now = anyio.current_time()
        self.hub.limits.acquire_generation(self.user, now)
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
        generation = Generation(request=request, ref=StreamRef.of(stream_id), accepted_at=now)
        self.generations[stream_id] = generation
        self.hub.generation_started()
        assert self._task_group is not None
        self._task_group.start_soon(self._run_generation, generation, name=f"generation {stream_id}")

    async def _run_generation(self, generation: Generation) -> None:
        hub = self.hub
        request = generation.request
        ref = generation.ref
        terminal: str | None = None
        outcome = "error"
        count = 0
        self._log(logging.DEBUG, "generation started", stream=request.id)
        try:
            with generation.scope:
                await self._put(Frame(ref, encode_start(request.id)))
                finish: FinishChunk | None = None
                put = self._put
                iterator = hub.backend.stream(request)
                try:
                    async for chunk in iterator:
                        if type(chunk) is TokenChunk:
                            if not chunk.text:
                                continue
                            if count == 0:
                                hub.metrics.ttft.observe(anyio.current_time() - generation.accepted_at)
                            await put(Token(ref, count, chunk.text))
                            count += 1
                            if count >= request.max_tokens:
                                finish = FinishChunk("length")
                                break
                        elif isinstance(chunk, FinishChunk):
                            finish = chunk
                            break
                finally:
                    aclose = getattr(iterator, "aclose", None)
                    if aclose is not None:
                        with anyio.move_on_after(ACLOSE_TIMEOUT_S, shield=True):
                            await aclose()
                finish = finish or FinishChunk("stop")
                prompt_tokens = finish.prompt_tokens if finish.prompt_tokens is not None else 0
                terminal = encode_done(request.id, finish.finish_reason, prompt_tokens, count)
                outcome = finish.finish_reason
            if generation.scope.cancelled_caught:
                terminal = generation.cancel_frame
                if terminal is None and generation.cancel_outcome == "cancelled":
                    terminal = encode_done(request.id, "cancelled", 0, count)
                outcome = generation.cancel_outcome
        except GatewayError as exc:
            terminal = encode_gateway_error(request.id, exc)
            outcome = str(exc.code)
            hub.metrics.errors.labels(str(exc.code)).inc()
            self._log(logging.INFO, "generation failed: %s", exc.code, stream=request.id)
        except Exception:
            logger.exception("conn=%s user=%s stream=%s backend raised", self.session_id, self.user, request.id)
            terminal = encode_error(request.id, ErrorCode.INTERNAL, "internal error")
            outcome = "internal"
            hub.metrics.errors.labels("internal").inc()
        finally:
            del self.generations[request.id]
            hub.limits.release_generation(self.user)
            hub.generation_ended()
            hub.metrics.generations_total.labels(outcome if outcome in _OUTCOMES else "other").inc()
            # After an abrupt close nobody would write the terminal frame: skip it.
            if terminal is not None and (self._graceful or not self._closing.is_set()):
                timeout = min(self.settings.slow_consumer_timeout_s, GRACEFUL_FLUSH_TIMEOUT_S)
                with anyio.move_on_after(timeout, shield=True):
                    with contextlib.suppress(ClosedResourceError, anyio.BrokenResourceError):
                        await self._put(Frame(ref, terminal))
            generation.finished.set()
            self._log(logging.DEBUG, "generation ended: %s", outcome, stream=request.id)


_OUTCOMES = frozenset({"stop", "length", "cancelled", "error", "internal"} | {str(c) for c in ErrorCode})
