"""Inbound messages: the frames a client may send, validated into typed messages.

A frame that is not JSON at all is a prompt, so a terminal user can just type; anything
else that is not a valid message raises ``FrameError`` naming the field, never echoing
the input (it may hold a prompt or a token).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from gateway.wire.codes import ErrorCode
from gateway.wire.errors import FrameError

StreamId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
RoomName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class _Inbound(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class AuthMessage(_Inbound):
    type: Literal["auth"]
    token: Annotated[str, StringConstraints(min_length=1, max_length=16384)]


ToolName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
ShortText = Annotated[str, StringConstraints(max_length=4096)]


def _image_url(value: str) -> str:
    if not value.startswith(("https://", "data:")):
        raise ValueError("must be an https: or a data: URL")
    return value


class TextPart(_Inbound):
    type: Literal["text"]
    text: str


class ImageURL(_Inbound):
    url: Annotated[str, AfterValidator(_image_url)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Inbound):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Inbound):
    name: ToolName
    arguments: str


class ToolCall(_Inbound):
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Inbound):
    role: Literal["system", "user", "assistant", "tool"]
    # None only for an assistant message that carries tool calls.
    content: str | Annotated[list[ContentPart], Field(min_length=1, max_length=64)] | None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=128)] | None = None
    tool_call_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message carries tool calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only a tool message carries tool_call_id")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a tool message must name the call it answers")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content: required (it may be null only beside tool_calls)")
        if isinstance(self.content, list) and self.role != "user" and any(
                isinstance(part, ImagePart) for part in self.content):
            raise ValueError("content: only a user message may carry images")
        return self

    def chars(self) -> int:
        """What counts toward ``GATEWAY_MAX_PROMPT_CHARS``: the texts and the tool calls'
        arguments. Images count toward ``GATEWAY_MAX_MESSAGE_BYTES`` only."""
        content = self.content
        if content is None:
            size = 0
        elif isinstance(content, str):
            size = len(content)
        else:
            size = sum(len(part.text) for part in content if isinstance(part, TextPart))
        return size + sum(len(call.function.arguments) for call in self.tool_calls or ())


class FunctionTool(_Inbound):
    name: ToolName
    description: ShortText | None = None
    # A JSON Schema object; passed to the backend as given.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Inbound):
    type: Literal["function"]
    function: FunctionTool


class NamedFunction(_Inbound):
    name: ToolName


class NamedToolChoice(_Inbound):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Inbound):
    name: ToolName
    description: ShortText | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormatText(_Inbound):
    type: Literal["text"]


class ResponseFormatJSONObject(_Inbound):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(_Inbound):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
                          Field(discriminator="type")]


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
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> GenerateMessage:
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                tool.function.name for tool in self.tools or ()}:
            raise ValueError("tool_choice: names a function that is not in tools")
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if self.parallel_tool_calls is not None and not self.tools:
            raise ValueError("parallel_tool_calls: needs tools")
        return self

    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(m.chars() for m in self.messages or ())


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


# Pydantic names the branch of a union it tried in an error's location; the client sent none.
_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|tagged-union\[.*\]|function-.*\[.*\]|"
                     r"literal\[.*\]|[A-Z]\w*)$")
_TAGS = frozenset({"text", "image_url", "json_object", "json_schema"})
_FIELD_FIRST = re.compile(r"^([a-z_]+): (.+)$", re.DOTALL)


def _client_path(raw: tuple[int | str, ...]) -> tuple[str, ...]:
    parts = [str(p) for p in raw]
    path: list[str] = []
    for index, part in enumerate(parts):
        if _BRANCH.match(part):
            continue
        # A tagged union puts its tag (the client's "type") before the field; each tagged
        # model here names its field after its tag: {"type":"image_url","image_url":{…}}.
        if index + 1 < len(parts) and parts[index + 1] == part and part in _TAGS:
            continue
        path.append(part)
    return tuple(path)


def _describe(exc: ValidationError) -> str:
    """Where and what, from the client's point of view: the field's path as the client
    wrote it, and for a union only the branch that got furthest. Only locations and
    messages: never the input, which may hold a prompt or a token."""
    found: list[tuple[tuple[str, ...], str]] = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = _client_path(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        named = _FIELD_FIRST.match(message)
        if named:  # our validators say which field they mean: "tool_choice: needs tools"
            loc, message = (*loc, named.group(1)), named.group(2)
        found.append((loc, message))
    kept: list[str] = []
    for loc, message in found:
        if any(len(other) > len(loc) and other[: len(loc)] == loc for other, _ in found):
            continue  # a union's other branch got further into this field
        line = f"{'.'.join(loc)}: {message}" if loc else message
        if line not in kept:
            kept.append(line)
    return "; ".join(kept[:3])


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


def validate_generate(fields: dict[str, Any]) -> GenerateMessage:
    """A ``generate`` from fields already decoded (the HTTP API's Chat Completions body):
    the same checks, and the same ``FrameError`` naming the field, as a socket's frame."""
    try:
        return GenerateMessage.model_validate({**fields, "type": "generate"})
    except ValidationError as exc:
        raise FrameError(_describe(exc)) from None
