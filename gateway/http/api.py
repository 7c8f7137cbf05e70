"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` (streamed or not),
``GET /v1/chat/completions/{id}`` (resume, on any process), ``POST
/v1/chat/completions/{id}/cancel`` and ``GET /v1/models``.

A generation asked for over HTTP is an ordinary hub ``Generation`` (transport ``http``):
the same admission, per-user limits, store, metrics and resume as the socket's. The HTTP
response *follows* it, as a connection does; a dropped response detaches it, and it runs
on for ``GATEWAY_HTTP_RESUME_GRACE_S``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware

from gateway.auth import Principal
from gateway.cluster.base import StreamMeta, TokenBatch
from gateway.cluster.control import Cancel, FollowNotice
from gateway.generation import Follow, Generation
from gateway.http.items import ItemSource, collect, sse_events
from gateway.http.sink import EventStream, ResponseSink
from gateway.hub import Hub, publish_or_unavailable
from gateway.store_writer import follow_notice_interval
from gateway.streams import create_generation, generation_request, new_stream_id
from gateway.wire.coalesce import DELTA_TYPES, End, OutItem, Start, StreamRef, Token, delta_item, delta_runs
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import AuthError, BadRequest, GatewayError
from gateway.wire.events import Done, Failed
from gateway.wire.inbound import GenerateMessage
from gateway.wire.openai_http import (
    UNAUTHORIZED,
    ChunkEncoder,
    completion_body,
    error_body,
    http_status,
    models_body,
    parse_chat_request,
)

logger = logging.getLogger("gateway.http")

GENERATION_ID_HEADER = "x-generation-id"
# What the request metric records for a client that went away before its answer (nginx's
# "client closed request"); nobody reads the response.
CLIENT_GONE = 499
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


class HttpError(Exception):
    """A request refused before its response started."""

    def __init__(self, code: str, message: str, *, param: str | None = None, retry_after_s: float | None = None,
                 generation_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.generation_id = generation_id

    @classmethod
    def of(cls, exc: GatewayError, generation_id: str | None = None) -> HttpError:
        retry = exc.extra.get("retry_after_s")
        if retry is None and exc.code in (ErrorCode.TOO_MANY_STREAMS, ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE,
                                          ErrorCode.SHUTTING_DOWN):
            retry = 1.0
        return cls(str(exc.code), exc.message, param=exc.extra.get("param"), retry_after_s=retry,
                   generation_id=generation_id)

    def response(self, headers: dict[str, str] | None = None) -> Response:
        status, _ = http_status(self.code)
        headers = dict(headers or {})
        if self.generation_id is not None:
            headers[GENERATION_ID_HEADER] = self.generation_id
        if self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after_s + 0.499)))
        if status == 401:
            headers["www-authenticate"] = "Bearer"
        return Response(error_body(self.code, self.message, self.param), status_code=status,
                        media_type="application/json", headers=headers)


Handler = Callable[[Hub, Request, Principal], Awaitable[Response]]


def _endpoint(name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authentication, errors in OpenAI's shape and the request metric, for every endpoint."""

    async def endpoint(request: Request) -> Response:
        hub: Hub = request.app.state.hub
        try:
            principal = await _authenticate(hub, request)
            response = await handler(hub, request, principal)
        except HttpError as exc:
            response = exc.response()
        except GatewayError as exc:
            response = HttpError.of(exc).response()
        except Exception:
            logger.exception("%s failed", name)
            response = HttpError(str(ErrorCode.INTERNAL), "internal error").response()
        status = response.status_code if isinstance(response, Response) else 200
        hub.metrics.http_requests.labels(name, str(status)).inc()
        return response

    return endpoint


async def _authenticate(hub: Hub, request: Request) -> Principal:
    if not hub.auth.enabled:
        return Principal(user="anonymous", expires_at=None)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        hub.metrics.auth_failures.labels("no_credentials").inc()
        raise HttpError(UNAUTHORIZED, "an Authorization: Bearer <token> header is required")
    try:
        return await hub.auth.verify(token.strip())
    except AuthError as exc:
        hub.metrics.auth_failures.labels(exc.reason).inc()
        raise HttpError(UNAUTHORIZED, exc.message) from None


async def _body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _admit(hub: Hub, message: GenerateMessage, user: str, stream_id: str) -> None:
    """The socket's admission rules that do not depend on a connection."""
    settings = hub.settings
    if message.prompt_chars() > settings.max_prompt_chars:
        raise GatewayError(f"the prompt is longer than {settings.max_prompt_chars} characters",
                           code=ErrorCode.PROMPT_TOO_LONG)
    if message.max_tokens is not None and message.max_tokens > settings.max_tokens:
        raise GatewayError(f"max_tokens must be at most {settings.max_tokens}", code=ErrorCode.BAD_REQUEST,
                           param="max_tokens")
    if (user, stream_id) in hub.generations:
        raise GatewayError("a generation with this id is already running", code=ErrorCode.DUPLICATE_ID)
    if hub.draining:
        raise GatewayError("the server is shutting down; try again", code=ErrorCode.SHUTTING_DOWN)


async def _sink_source(sink: ResponseSink, heartbeat_s: float) -> ItemSource:
    while True:
        yield await sink.take(heartbeat_s)


async def _first_items(sink: ResponseSink, wait_s: float) -> list[OutItem]:
    """What comes within ``wait_s`` up to the first delta or the end: a generation
    refused before its first delta is answered with a status rather than a stream."""
    items: list[OutItem] = []
    with anyio.move_on_after(wait_s):
        while not any(isinstance(item, (*DELTA_TYPES, End)) for item in items):
            items += await sink.take(None)
    return items


async def _prefixed(first: list[OutItem], source: ItemSource) -> ItemSource:
    if first:
        yield first
    async with contextlib.aclosing(source) as rest:  # type: ignore[type-var]
        async for items in rest:
            yield items


async def chat_completions(hub: Hub, request: Request, principal: Principal) -> Response:
    settings = hub.settings
    try:
        chat = parse_chat_request(await _body(request, settings.max_message_bytes),
                                  request.headers.get(GENERATION_ID_HEADER))
    except GatewayError as exc:
        raise HttpError.of(exc) from None
    message = chat.message
    user = principal.user
    stream_id = message.id or new_stream_id()
    try:
        _admit(hub, message, user, stream_id)
        generation = await create_generation(
            hub, generation_request(message, stream_id, user, settings.default_max_tokens), None,
            log_name="http", transport="http")
    except GatewayError as exc:
        # Refused before it started; the id it would have had (or the one the client
        # chose) still names it.
        raise HttpError.of(exc, stream_id) from None
    sink = ResponseSink(settings.send_queue_size)
    follow = generation.follow(sink)
    hub.start_generation(generation)
    model = message.model or hub.backend.name
    created = int(generation.meta.created_at)
    headers = {GENERATION_ID_HEADER: stream_id}
    if chat.stream:
        try:
            first = await _first_items(sink, settings.heartbeat_interval_s)
        except BaseException:
            _stop_following(sink, follow)
            raise
        refused = first[-1].terminal if first and isinstance(first[-1], End) else None
        if isinstance(refused, Failed) and not any(isinstance(item, DELTA_TYPES) for item in first):
            # Failed before its first delta (a model the backend refuses, an upstream's
            # 4xx): the status says so, as OpenAI's does.
            _stop_following(sink, follow)
            return _completion_response(stream_id, created, model, "", "", [], refused, headers)
        encoder = ChunkEncoder(stream_id, created, model)
        events = sse_events(_prefixed(first, _sink_source(sink, settings.heartbeat_interval_s)), encoder,
                            include_usage=chat.include_usage, send_role=True)
        return EventStream(headers, events, partial(_stop_following, sink, follow),
                           write_timeout_s=settings.slow_consumer_timeout_s)
    try:
        collected = await _collect_while_connected(request, _sink_source(sink, settings.heartbeat_interval_s))
    finally:
        _stop_following(sink, follow)
    if collected is None:
        return Response(status_code=CLIENT_GONE)
    return _completion_response(stream_id, created, model, *collected, headers)


async def _collect_while_connected(request: Request, source: ItemSource,
                                   feed: Callable[[], Coroutine[Any, Any, None]] | None = None
                                   ) -> tuple[str, str, list[dict[str, Any]], Done | Failed | None] | None:
    """``collect``, or None when the client goes away first (the generation is then
    detached by the caller, not cancelled). ``feed`` runs meanwhile: a relay that fills
    ``source``."""
    collected: tuple[str, str, list[dict[str, Any]], Done | Failed | None] | None = None
    async with anyio.create_task_group() as task_group:

        async def watch_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            task_group.cancel_scope.cancel()

        task_group.start_soon(watch_disconnect)
        if feed is not None:
            task_group.start_soon(feed)
        collected = await collect(source)
        task_group.cancel_scope.cancel()
    return collected


def _stop_following(sink: ResponseSink, follow: Follow) -> None:
    """The response ended or its client went away: a generation still running is detached
    (not cancelled), as for a dropped socket."""
    sink.close()
    follow.generation.detach(follow)


def _completion_response(stream_id: str, created: int, model: str, content: str, reasoning: str,
                         tool_calls: list[dict[str, Any]], terminal: Done | Failed | None,
                         headers: dict[str, str]) -> Response:
    if terminal is None:
        terminal = Failed(str(ErrorCode.INTERNAL), "the generation ended without its terminal event")
    if isinstance(terminal, Failed):
        return HttpError(terminal.code, terminal.message, retry_after_s=terminal.extra.get("retry_after_s")
                         ).response(headers)
    return Response(completion_body(stream_id, created, model, content, reasoning, tool_calls, terminal),
                    media_type="application/json", headers=headers)


async def _stored_meta(hub: Hub, user: str, stream_id: str) -> StreamMeta:
    try:
        meta = await hub.store.get(user, stream_id)
    except Exception:
        raise GatewayError("the stream store is unreachable right now; try again", code=ErrorCode.UNAVAILABLE,
                           retry_after_s=1.0) from None
    if meta is None:
        raise GatewayError("no generation with this id", code=ErrorCode.NOT_FOUND)
    return meta


def _store_relay(hub: Hub, meta: StreamMeta, after: int, sink: ResponseSink) -> Callable[[], Coroutine[Any, Any, None]]:
    """A task that puts a generation's items from the stream store into ``sink``, after
    ``after``: the replay, the live tail and the terminal, while telling the producing
    process that the generation is followed. Owned by the response (``EventStream``'s
    task group, or the request's for a collected answer)."""
    ref = StreamRef.of(meta.id)

    async def relay() -> None:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(_announce, hub, meta)
            try:
                await sink.send(Start(ref, meta.epoch, meta.room, True))
                async for event in hub.store.follow(meta, after):
                    if isinstance(event, TokenBatch):
                        if event.kinds is None:
                            for offset, text in enumerate(event.texts):
                                await sink.send(Token(ref, event.first_seq + offset, text))
                        else:
                            for last_seq, text, kind in delta_runs(event.first_seq, event.texts, event.kinds):
                                await sink.send(delta_item(ref, last_seq, text, kind))
                    else:
                        await sink.send(End(ref, event))
                        break
                else:
                    await sink.send(End(ref, Failed(str(ErrorCode.NOT_FOUND), "the generation expired")))
            except anyio.ClosedResourceError:
                pass  # the response ended
            except Exception:
                logger.warning("stream=%s relaying from the stream store failed", meta.id)
                sink.send_urgent(End(ref, Failed(str(ErrorCode.UNAVAILABLE), "the stream store is unreachable"
                                                 " right now; resume again")))
            task_group.cancel_scope.cancel()

    return relay


async def _announce(hub: Hub, meta: StreamMeta) -> None:
    interval = follow_notice_interval(hub.settings)
    while True:
        with contextlib.suppress(Exception):
            await hub.publish(FollowNotice(meta.user, meta.id, meta.node, hub.cluster.node_id))
        await anyio.sleep(interval)


def _after(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("starting_after")
    if raw is None or raw == "":
        return -1
    try:
        after = int(raw)
    except ValueError:
        raise BadRequest("Last-Event-ID and starting_after must be an integer seq", param="starting_after") from None
    if after < -1:
        raise BadRequest("Last-Event-ID and starting_after must be -1 or more", param="starting_after")
    return after


def _path_id(request: Request) -> str:
    stream_id = str(request.path_params["generation_id"])
    if not _ID.fullmatch(stream_id):
        raise GatewayError("no generation with this id", code=ErrorCode.NOT_FOUND)
    return stream_id


async def resume(hub: Hub, request: Request, principal: Principal) -> Response:
    stream_id = _path_id(request)
    settings = hub.settings
    stream = request.query_params.get("stream", "false").lower() in ("true", "1")
    after = _after(request) if stream else -1
    user = principal.user
    headers = {GENERATION_ID_HEADER: stream_id}
    generation = hub.generations.get((user, stream_id))
    model = (generation.request.model if generation is not None else None) or hub.backend.name
    sink = ResponseSink(settings.send_queue_size)
    source = _sink_source(sink, settings.heartbeat_interval_s)
    background: Callable[[], Coroutine[Any, Any, None]] | None = None
    on_close: Callable[[], None] = sink.close
    if generation is not None and generation.terminal is None:
        created = int(generation.meta.created_at)
        follow, replay = generation.attach_for_resume(sink, after)
        # No await from here to ``live``: nothing produced meanwhile is lost or reordered.
        sink.extend([generation.start_item(resumed=True), *replay, *follow.backlog])
        follow.backlog = []
        follow.live = True
        if follow.ended.is_set():
            sink.follow_ended(follow)
        on_close = partial(_stop_following, sink, follow)
    else:
        meta = await _stored_meta(hub, user, stream_id)
        created = int(meta.created_at)
        background = _store_relay(hub, meta, after, sink)
    if stream:
        events = sse_events(source, ChunkEncoder(stream_id, created, model), include_usage=True,
                            send_role=after < 0)
        return EventStream(headers, events, on_close, background, write_timeout_s=settings.slow_consumer_timeout_s)
    try:
        collected = await _collect_while_connected(request, source, background)
    finally:
        on_close()
    if collected is None:
        return Response(status_code=CLIENT_GONE)
    return _completion_response(stream_id, created, model, *collected, headers)


async def cancel(hub: Hub, request: Request, principal: Principal) -> Response:
    stream_id = _path_id(request)
    user = principal.user
    generation: Generation | None = hub.generations.get((user, stream_id))
    if generation is not None:
        generation.cancel(None, "cancelled")
    else:
        meta = await _stored_meta(hub, user, stream_id)
        await publish_or_unavailable(hub, Cancel(user, stream_id, meta.node))
    return Response(b'{"id":"%s","object":"chat.completion.cancellation","cancelled":true}' % stream_id.encode(),
                    media_type="application/json", headers={GENERATION_ID_HEADER: stream_id})


async def models(hub: Hub, request: Request, principal: Principal) -> Response:
    listed = getattr(hub.backend, "model_ids", None)
    names = [m for m in listed if m != "*"] if listed else [hub.backend.name]
    return Response(models_body(names or [hub.backend.name], int(time.time())), media_type="application/json")


def install(app: FastAPI, hub: Hub) -> None:
    """The routes, and CORS for ``GATEWAY_ALLOWED_ORIGINS`` (preflight included)."""
    # Plain routes, not FastAPI's: a streamed answer is an ASGI response of its own.
    app.add_route("/v1/chat/completions", _endpoint("chat_completions", chat_completions), methods=["POST"])
    app.add_route("/v1/chat/completions/{generation_id}", _endpoint("resume", resume), methods=["GET"])
    app.add_route("/v1/chat/completions/{generation_id}/cancel", _endpoint("cancel", cancel), methods=["POST"])
    app.add_route("/v1/models", _endpoint("models", models), methods=["GET"])
    origins = hub.settings.allowed_origins
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"], expose_headers=[GENERATION_ID_HEADER, "retry-after"], max_age=600)
