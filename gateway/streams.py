"""A connection's generations: starting one, cancelling, resuming (from the generation
itself on this process, or from the stream store), and ending or detaching them all when
the connection closes.

A connection *follows* a generation; the generation runs in the hub and outlives the
socket (see ``gateway.generation``). ``follows`` maps each stream id to a local ``Follow``
or a ``RemoteFollow`` (relayed from the store, owned by a task in the connection's group).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from config import Settings
from gateway.backends import ChatTurn, ContentPart, GenerationRequest, Tool, ToolCall, refusal
from gateway.backends import ImagePart as ImageInput
from gateway.backends import TextPart as TextInput
from gateway.cluster.base import StreamMeta, TokenBatch
from gateway.cluster.control import Cancel, FollowNotice
from gateway.core.state import ConnectionState
from gateway.generation import Follow, Generation
from gateway.hub import Hub, publish_or_unavailable
from gateway.outbox import Outbox
from gateway.store_writer import follow_notice_interval
from gateway.wire.coalesce import End, OutItem, Start, StreamRef, Token, delta_item, delta_runs
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import BadRequest, GatewayError, RetryLater
from gateway.wire.events import Failed
from gateway.wire.inbound import ChatMessage, GenerateMessage, ImagePart, NamedToolChoice, TextPart

logger = logging.getLogger("gateway.connection")

# A cancel for a stream followed nowhere here is answered by relaying the store from this
# far: past every token, so only the terminal event comes.
PAST_EVERY_TOKEN = 1 << 62


def new_stream_id() -> str:
    return "g-" + secrets.token_hex(8)


def new_epoch() -> str:
    return "e-" + secrets.token_hex(6)


def _content(content: str | list[TextPart | ImagePart] | None) -> str | tuple[ContentPart, ...] | None:
    if content is None or isinstance(content, str):
        return content
    return tuple(TextInput(part.text) if isinstance(part, TextPart)
                 else ImageInput(part.image_url.url, part.image_url.detail) for part in content)


def _turn(message: ChatMessage) -> ChatTurn:
    return ChatTurn(
        message.role, _content(message.content),
        tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()),
        message.tool_call_id,
    )


def generation_request(message: GenerateMessage, stream_id: str, user: str, default_max_tokens: int
                       ) -> GenerationRequest:
    """What the backend is asked for: the generate message, validated, in backend terms."""
    stop = message.stop
    choice = message.tool_choice
    return GenerationRequest(
        id=stream_id,
        user=user,
        max_tokens=message.max_tokens or default_max_tokens,
        prompt=message.prompt,
        messages=tuple(_turn(m) for m in message.messages or ()),
        temperature=message.temperature,
        top_p=message.top_p,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        model=message.model,
        tools=tuple(Tool(t.function.name, t.function.description, t.function.parameters, t.function.strict)
                    for t in message.tools or ()),
        tool_choice=choice if isinstance(choice, str) or choice is None else "function",
        tool_choice_function=choice.function.name if isinstance(choice, NamedToolChoice) else None,
        parallel_tool_calls=message.parallel_tool_calls,
        response_format=(message.response_format.model_dump(by_alias=True, exclude_none=True)
                         if message.response_format is not None else None),
        seed=message.seed,
        reasoning_effort=message.reasoning_effort,
        frequency_penalty=message.frequency_penalty,
        presence_penalty=message.presence_penalty,
    )


async def create_generation(hub: Hub, request: GenerationRequest, room: str | None, *, log_name: str,
                            transport: str = "ws") -> Generation:
    """A generation for an admitted request, not yet started: the backend's refusal, the
    user's generation slot (``too_many_streams``, ``rate_limited``) and the id's claim in
    the stream store (``duplicate_id``) are checked here, for every transport alike."""
    refused = refusal(hub.backend, request)
    if refused is not None:
        raise BadRequest(refused)
    user = request.user
    stream_id = request.id
    accepted_at = anyio.current_time()
    lease = await hub.limits.acquire_generation(user)
    meta = StreamMeta(user=user, id=stream_id, epoch=new_epoch(), node=hub.node_id,
                      created_at=time.time(), room=room)
    # From here until the hub owns the generation nothing may leak the lease: no await
    # follows the store's create.
    try:
        created = await hub.store.create(meta)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await lease.release()
        if not isinstance(exc, Exception) or isinstance(exc, GatewayError):
            raise
        logger.warning("conn=%s stream=%s stream store create failed: %s", log_name, stream_id,
                       type(exc).__name__)
        raise RetryLater("the stream store is unavailable; try again") from None
    if not created:
        await lease.release()
        raise GatewayError("this id was used recently; pick another or resume it", code=ErrorCode.DUPLICATE_ID)
    return Generation(hub, meta, request, lease, accepted_at, transport)


@dataclass(eq=False)
class RemoteFollow:
    """Following a generation through the stream store (it runs on another process, or it
    has finished). Owned by a task in the connection's task group."""

    meta: StreamMeta
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class StreamsHost(Protocol):
    """What ``Streams`` needs of its connection. Generations deliver to its outbox."""

    hub: Hub
    settings: Settings
    user: str
    session_id: str
    state: ConnectionState
    outbox: Outbox

    @property
    def joined_rooms(self) -> set[str] | None: ...

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None: ...

    def log(self, level: int, message: str, *args: Any, stream: str | None = None) -> None: ...


class Streams:
    __slots__ = ("_cancel_answers", "_room_generations", "follows", "host")

    def __init__(self, host: StreamsHost) -> None:
        self.host = host
        self.follows: dict[str, Follow | RemoteFollow] = {}
        # Room generations this connection started and that still run: they count toward
        # GATEWAY_MAX_STREAMS_PER_CONNECTION like the ones it follows. Created on first use.
        self._room_generations: list[Generation] | None = None
        # Created on first use: most connections never cancel a generation they do not
        # follow, and an empty set is 216 bytes.
        self._cancel_answers: set[str] | None = None

    async def start(self, message: GenerateMessage) -> None:
        """Admit a generate or raise the error that refuses it."""
        host = self.host
        settings = host.settings
        hub = host.hub
        user = host.user
        stream_id = message.id or new_stream_id()
        rooms = host.joined_rooms
        host.state.admit_generate(
            prompt_chars=message.prompt_chars(), max_tokens=message.max_tokens, room=message.room,
            in_room=message.room is not None and rooms is not None and message.room in rooms,
            id_taken=stream_id in self.follows or (user, stream_id) in hub.generations,
            draining=hub.draining, following=self.running(),
        )
        request = generation_request(message, stream_id, user, settings.default_max_tokens)
        generation = await create_generation(hub, request, message.room, log_name=host.session_id)
        if message.room is None:
            # The generation sends its own start frame first (see Generation._produce).
            self.follows[stream_id] = generation.follow(host.outbox)
        else:
            if self._room_generations is None:
                self._room_generations = []
            self._room_generations.append(generation)
        host.log(logging.DEBUG, "generation started", stream=stream_id)
        hub.start_generation(generation)

    def running(self) -> int:
        """Generations this connection follows or started in a room, still running."""
        rooms = self._room_generations
        if rooms:
            rooms[:] = [generation for generation in rooms if not generation.finished.is_set()]
        return len(self.follows) + (len(rooms) if rooms else 0)

    async def cancel(self, stream_id: str) -> None:
        host = self.host
        hub = host.hub
        follow = self.follows.get(stream_id)
        if isinstance(follow, Follow):
            follow.generation.cancel(None, "cancelled")
            return
        generation = hub.generations.get((host.user, stream_id))
        if generation is not None:
            generation.cancel(None, "cancelled")
            if follow is None:
                self._spawn_cancel_answer(stream_id, self._send_terminal_when_finished, generation)
            return
        meta = await self._stored_meta(stream_id)
        if meta is None:
            raise GatewayError("no generation with this id", code=ErrorCode.NOT_FOUND)
        await publish_or_unavailable(hub, Cancel(host.user, stream_id, meta.node))
        if follow is None:
            # Not following it here: answer with its terminal frame when it comes.
            self._spawn_cancel_answer(stream_id, self._follow_store, meta, PAST_EVERY_TOKEN, False)

    def _spawn_cancel_answer(self, stream_id: str, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """At most one pending answer per id, and no more than the stream limit in all."""
        answers = self._cancel_answers
        if answers is None:
            answers = self._cancel_answers = set()
        if stream_id in answers:
            return
        if len(answers) >= self.host.settings.max_streams_per_connection:
            raise GatewayError("too many cancels awaiting their answer", code=ErrorCode.TOO_MANY_STREAMS)
        answers.add(stream_id)

        async def answer() -> None:
            try:
                await func(*args)
            finally:
                answers.discard(stream_id)

        self.host.spawn(answer)

    async def _stored_meta(self, stream_id: str) -> StreamMeta | None:
        try:
            return await self.host.hub.store.get(self.host.user, stream_id)
        except Exception:
            raise RetryLater("the stream store is unreachable right now; try again") from None

    async def _send_terminal_when_finished(self, generation: Generation) -> None:
        await generation.finished.wait()
        if generation.terminal is not None:
            await self.host.outbox.send_queued(End(StreamRef.of(generation.id), generation.terminal))

    async def resume(self, stream_id: str, after: int) -> None:
        host = self.host
        if stream_id in self.follows:
            raise GatewayError("this connection already follows that generation", code=ErrorCode.DUPLICATE_ID)
        limit = host.settings.max_streams_per_connection
        if self.running() >= limit:
            raise GatewayError(f"at most {limit} generations per connection", code=ErrorCode.TOO_MANY_STREAMS)
        generation = host.hub.generations.get((host.user, stream_id))
        if generation is not None and generation.terminal is None:
            follow, replay = generation.attach_for_resume(host.outbox, after)
            self.follows[stream_id] = follow
            host.spawn(self._replay_local, follow, replay)
            return
        meta = await self._stored_meta(stream_id)
        if meta is None:
            raise GatewayError("no generation with this id", code=ErrorCode.NOT_FOUND)
        remote = RemoteFollow(meta)
        self.follows[stream_id] = remote
        host.spawn(self._follow_store, meta, after, True, remote)

    async def _replay_local(self, follow: Follow, replay: list[OutItem]) -> None:
        generation = follow.generation
        send = self.host.outbox.send_queued
        await send(generation.start_item(resumed=True))
        for item in replay:
            await send(item)
        # Hand over to live delivery: drain what arrived meanwhile, then switch with no
        # await between the last emptiness check and ``live = True``.
        while follow.backlog:
            waiting, follow.backlog = follow.backlog, []
            for item in waiting:
                await send(item)
        follow.live = True
        if follow.ended.is_set():
            self.follow_ended(follow)

    async def _follow_store(self, meta: StreamMeta, after: int, announce: bool,
                            remote: RemoteFollow | None = None) -> None:
        """Relay a stored generation: replay after ``after``, the live tail, the terminal.
        With ``announce`` False only the terminal is relayed (a cancel's answer)."""
        ref = StreamRef.of(meta.id)
        send = self.host.outbox.send_queued
        scope = remote.scope if remote is not None else anyio.CancelScope()
        try:
            with scope:
                async with anyio.create_task_group() as tg:
                    if announce:
                        tg.start_soon(self._announce_follow, meta)
                        await send(Start(ref, meta.epoch, meta.room, True))
                    async for event in self.host.hub.store.follow(meta, after):
                        if isinstance(event, TokenBatch):
                            if event.kinds is None:
                                for offset, text in enumerate(event.texts):
                                    await send(Token(ref, event.first_seq + offset, text))
                            else:
                                for last_seq, text, kind in delta_runs(event.first_seq, event.texts, event.kinds):
                                    await send(delta_item(ref, last_seq, text, kind))
                        else:
                            await send(End(ref, event))
                            break
                    tg.cancel_scope.cancel()
        finally:
            if remote is not None and self.follows.get(meta.id) is remote:
                del self.follows[meta.id]

    async def _announce_follow(self, meta: StreamMeta) -> None:
        """Tell the producing process, periodically, that this generation is followed."""
        hub = self.host.hub
        interval = follow_notice_interval(self.host.settings)
        while True:
            with contextlib.suppress(Exception):
                await hub.publish(FollowNotice(meta.user, meta.id, meta.node, hub.cluster.node_id))
            await anyio.sleep(interval)

    def follow_ended(self, follow: Follow) -> None:
        """The generation delivered its terminal event. A follower still replaying is
        removed by its replay task once the backlog is out, so a second resume of the same
        id cannot start meanwhile."""
        if follow.live and self.follows.get(follow.generation.id) is follow:
            del self.follows[follow.generation.id]
            if not self.follows:
                self.host.outbox.nudge()

    async def end_all(self, terminal: Failed | None) -> None:
        """Graceful close: each followed generation ends with ``terminal`` (default: done,
        cancelled); those running on another process are only left (this socket stops
        following them), with ``terminal`` sent here."""
        local: list[Follow] = []
        send = self.host.outbox.send_queued
        for follow in list(self.follows.values()):
            if isinstance(follow, Follow):
                local.append(follow)
                follow.generation.cancel(terminal, terminal.code if terminal else "cancelled")
            else:
                follow.scope.cancel()
                if terminal is not None:
                    await send(End(StreamRef.of(follow.meta.id), terminal))
        for follow in local:
            await follow.ended.wait()

    def detach_all(self) -> None:
        """The socket is gone: stop following. A detached generation keeps running for the
        resume grace period (see ``Hub.generation_detached``)."""
        follows = list(self.follows.values())
        self.follows.clear()
        for follow in follows:
            if isinstance(follow, Follow):
                follow.generation.detach(follow)
            else:
                follow.scope.cancel()
