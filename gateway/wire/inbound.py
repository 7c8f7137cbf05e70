"""Inbound messages: the frames a client may send, validated into typed messages.

A frame that is not JSON at all is a prompt, so a terminal user can just type; anything
else that is not a valid message raises ``FrameError`` naming the field, never echoing
the input (it may hold a prompt or a token).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from gateway.wire.codes import ErrorCode
from gateway.wire.errors import FrameError

StreamId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
RoomName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]


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
