"""Wire protocol v1: message models, parsing and encoding. No I/O happens here.

Inbound frames are validated into typed messages (``parse_client_frame``); outbound frames
are encoded by the ``encode_*`` functions. ``coalesce`` merges the token frames that are
waiting in a connection's queue, which is how a slow client gets fewer, larger frames
without losing a token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from gateway.errors import BadRequest, ErrorCode, GatewayError

PROTOCOL = "gateway.v1"
BEARER_SUBPROTOCOL_PREFIX = "bearer."

StreamId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class _Inbound(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class AuthMessage(_Inbound):
    type: Literal["auth"]
    token: Annotated[str, StringConstraints(min_length=1, max_length=16384)]


class ChatMessage(_Inbound):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class GenerateMessage(_Inbound):
    type: Literal["generate"]
    id: StreamId | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    model: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    room: RoomName | None = None

    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m.content) for m in self.messages or ())


class CancelMessage(_Inbound):
    type: Literal["cancel"]
    id: StreamId


class ResumeMessage(_Inbound):
    type: Literal["resume"]
    id: StreamId
    after: Annotated[int, Field(ge=-1)] = -1


RoomName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class JoinMessage(_Inbound):
    type: Literal["join"]
    room: RoomName


class LeaveMessage(_Inbound):
    type: Literal["leave"]
    room: RoomName


class PingMessage(_Inbound):
    type: Literal["ping"]


class PongMessage(_Inbound):
    type: Literal["pong"]


ClientMessage = (
    AuthMessage
    | GenerateMessage
    | CancelMessage
    | ResumeMessage
    | JoinMessage
    | LeaveMessage
    | PingMessage
    | PongMessage
)

_MODELS: dict[str, type[_Inbound]] = {
    "auth": AuthMessage,
    "generate": GenerateMessage,
    "cancel": CancelMessage,
    "resume": ResumeMessage,
    "join": JoinMessage,
    "leave": LeaveMessage,
    "ping": PingMessage,
    "pong": PongMessage,
}


class FrameError(GatewayError):
    """A frame that could not be parsed; ``stream_id`` is set when the frame named one."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.BAD_REQUEST, stream_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.stream_id = stream_id


def _describe(exc: ValidationError) -> str:
    # Only locations and messages: never the input, which may hold a prompt or a token.
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def _safe_stream_id(data: dict[str, Any]) -> str | None:
    value = data.get("id")
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", value):
        return value
    return None


def parse_client_frame(text: str) -> ClientMessage:
    """Parse one inbound text frame.

    A frame that is not JSON at all is a prompt, so a terminal user can just type.
    Raises ``FrameError`` for anything else that is not a valid message.
    """
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return GenerateMessage(type="generate", prompt=text)
    if not isinstance(data, dict):
        raise FrameError('a frame must be a JSON object with a "type" field')
    kind = data.get("type")
    stream_id = _safe_stream_id(data)
    if not isinstance(kind, str):
        raise FrameError('missing or invalid "type" field', stream_id=stream_id)
    model = _MODELS.get(kind)
    if model is None:
        shown = kind if re.fullmatch(r"[A-Za-z0-9_.\-]{1,32}", kind) else "?"
        raise FrameError(f"unknown message type {shown!r}", code=ErrorCode.UNKNOWN_TYPE, stream_id=stream_id)
    try:
        message = model.model_validate(data)
    except ValidationError as exc:
        raise FrameError(_describe(exc), stream_id=stream_id) from None
    if isinstance(message, GenerateMessage) and (message.prompt is None) == (message.messages is None):
        raise FrameError('exactly one of "prompt" or "messages" is required', stream_id=stream_id)
    return message  # type: ignore[return-value]


# Outbound frames ---------------------------------------------------------------------------

PING_FRAME = '{"type":"ping"}'
PONG_FRAME = '{"type":"pong"}'


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def encode_hello(*, session: str, user: str, heartbeat_s: float, limits: dict[str, Any],
                 resumable: list[dict[str, str]] | None = None) -> str:
    heartbeat: float | int = int(heartbeat_s) if float(heartbeat_s).is_integer() else heartbeat_s
    return _dumps(
        {
            "type": "hello",
            "session": session,
            "user": user,
            "protocol": PROTOCOL,
            "heartbeat_s": heartbeat,
            "limits": limits,
            "resumable": resumable or [],
        }
    )


def encode_start(stream_id: str, epoch: str | None = None, *, resumed: bool = False,
                 room: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "start", "id": stream_id}
    if epoch is not None:
        frame["epoch"] = epoch
    if resumed:
        frame["resumed"] = True
    if room is not None:
        frame["room"] = room
    return _dumps(frame)


def encode_presence(room: str, user: str, event: str) -> str:
    return _dumps({"type": "presence", "room": room, "user": user, "event": event})


def encode_broadcast(data: Any) -> str:
    return _dumps({"type": "broadcast", "data": data})


def encode_room_ack(kind: str, room: str) -> str:
    """``joined`` or ``left``."""
    return _dumps({"type": kind, "room": room})


def encode_done(stream_id: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> str:
    return _dumps(
        {
            "type": "done",
            "id": stream_id,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        }
    )


def encode_error(stream_id: str | None, code: ErrorCode | str, message: str, **extra: Any) -> str:
    frame: dict[str, Any] = {"type": "error", "id": stream_id, "code": str(code), "message": message}
    frame.update(extra)
    return _dumps(frame)


def encode_gateway_error(stream_id: str | None, exc: GatewayError) -> str:
    return encode_error(stream_id, exc.code, exc.message, **exc.extra)


def encode_tokens(id_json: str, seq: int, text: str) -> str:
    # The hot path: one call per outbound token frame. ``id_json`` is the stream id,
    # already JSON-encoded once per generation.
    return '{"type":"token","id":' + id_json + ',"seq":' + str(seq) + ',"text":' + _dumps(text) + "}"


# Outbound queue items and coalescing ------------------------------------------------------


@dataclass(eq=False, slots=True)
class StreamRef:
    """Identity of one generation in the outbound queue."""

    id: str
    id_json: str

    @classmethod
    def of(cls, stream_id: str) -> StreamRef:
        return cls(stream_id, _dumps(stream_id))


class Token(NamedTuple):
    stream: StreamRef
    seq: int
    text: str


class Frame(NamedTuple):
    """An encoded frame; ``stream`` is set when it belongs to a generation (start, done, error)."""

    stream: StreamRef | None
    text: str


OutItem = Token | Frame


class Coalesced(NamedTuple):
    frames: list[str]
    tokens: int
    merged_frames: int


def coalesce(items: Sequence[OutItem] | Iterable[OutItem]) -> Coalesced:
    """Encode queued items, merging each stream's consecutive waiting tokens into one frame.

    Guarantees: within a stream, frames keep their order, every token appears exactly once,
    and a frame's ``seq`` is that of the last token it carries. A stream's start frame comes
    before its tokens and its terminal frame after them, because a non-token frame closes
    the stream's open run.
    """
    out: list[str | list[Any]] = []
    open_runs: dict[int, list[Any]] = {}  # id(StreamRef) -> [stream, last_seq, [texts]]
    tokens = 0
    runs = 0
    for item in items:
        if type(item) is Token:
            tokens += 1
            run = open_runs.get(id(item.stream))
            if run is None:
                run = [item.stream, item.seq, [item.text]]
                open_runs[id(item.stream)] = run
                out.append(run)
                runs += 1
            else:
                run[1] = item.seq
                run[2].append(item.text)
        else:
            if item.stream is not None:
                open_runs.pop(id(item.stream), None)
            out.append(item.text)
    frames: list[str] = []
    for entry in out:
        if isinstance(entry, str):
            frames.append(entry)
        else:
            stream, seq, texts = entry
            frames.append(encode_tokens(stream.id_json, seq, texts[0] if len(texts) == 1 else "".join(texts)))
    return Coalesced(frames, tokens, tokens - runs)


__all__ = [
    "BEARER_SUBPROTOCOL_PREFIX",
    "PING_FRAME",
    "PONG_FRAME",
    "PROTOCOL",
    "AuthMessage",
    "BadRequest",
    "CancelMessage",
    "ChatMessage",
    "ClientMessage",
    "Coalesced",
    "Frame",
    "FrameError",
    "GenerateMessage",
    "JoinMessage",
    "LeaveMessage",
    "OutItem",
    "PingMessage",
    "PongMessage",
    "ResumeMessage",
    "StreamRef",
    "Token",
    "coalesce",
    "encode_broadcast",
    "encode_done",
    "encode_error",
    "encode_gateway_error",
    "encode_hello",
    "encode_presence",
    "encode_room_ack",
    "encode_start",
    "encode_tokens",
    "parse_client_frame",
]
