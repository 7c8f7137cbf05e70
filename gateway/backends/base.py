"""The generator backend interface.

A backend turns one ``GenerationRequest`` into an asynchronous iterator of chunks:
``TokenChunk`` for each piece of answer text, ``ReasoningChunk`` for each piece of the
model's reasoning, ``ToolCallChunk`` for each fragment of a tool call, and optionally one
``FinishChunk`` at the end with the finish reason and usage. Guarantees the gateway relies on:

- chunks come in generation order; the concatenated ``TokenChunk.text`` is the answer, the
  concatenated ``ReasoningChunk.text`` the reasoning, and the concatenated
  ``ToolCallChunk.arguments`` of one ``index`` that call's arguments, whose first chunk
  carries its ``call_id`` and ``name``;
- a request that uses a feature the backend does not list in ``features`` never reaches
  it: the gateway refuses it with ``bad_request`` naming the field (``refusal``);
- the gateway may stop iterating at any time (a cancel, a closed socket, ``max_tokens``);
  it then calls ``aclose()`` on the iterator promptly, so a backend written as an async
  generator can stop its upstream work in a ``finally`` block;
- faults are raised as ``gateway.wire.errors.GatewayError`` subclasses (``BackendError``,
  ``BackendTimeout``, ``RateLimited``); any other exception reaches the client as
  ``internal`` with no detail.

A backend with settings of its own declares them as a ``BackendSettings`` subclass with
the prefix ``GATEWAY_<NAME>_``, names it in a ``settings_model`` class attribute, and reads
them with ``settings.backend_settings_as(ThatModel)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from config import Settings
from config.backends import BackendSettings as BackendSettings
from gateway.wire.events import RouteTrace


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    url: str  # https: or data:
    detail: str | None = None


ContentPart = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call an assistant made, as it is sent back in a conversation."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is its JSON Schema."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str | tuple[ContentPart, ...] | None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        """The turn's text: its content, or its text parts joined."""
        content = self.content
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part.text for part in content if isinstance(part, TextPart))


# The features a request may use beyond plain text, as backends declare them in
# ``features``: each is named after the request field that asks for it.
TOOLS = "tools"  # tools, tool_choice, parallel_tool_calls, tool calls in the conversation
IMAGES = "images"  # image_url content parts
RESPONSE_FORMAT = "response_format"
SEED = "seed"
REASONING_EFFORT = "reasoning_effort"
PENALTIES = "penalties"  # frequency_penalty, presence_penalty
# Not a client's: the router's continuation of an answer cut mid-stream, the final assistant
# message continued (``continue_final_message``, as vLLM and SGLang take it).
CONTINUATION = "continuation"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    id: str
    user: str
    max_tokens: int
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    model: str | None = None
    tools: tuple[Tool, ...] = ()
    # "none", "auto", "required", or the name of the one function the model must call.
    tool_choice: str | None = None
    tool_choice_function: str | None = None
    parallel_tool_calls: bool | None = None
    # {"type":"text"|"json_object"} or {"type":"json_schema","json_schema":{…}}, as sent.
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    reasoning_effort: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # The last message is the start of the assistant's answer, to be continued (the router
    # sets it after a mid-stream failure, for a backend that lists ``CONTINUATION``).
    continue_final_message: bool = False

    def last_user_text(self) -> str:
        """The prompt, or the text of the last user message."""
        if self.prompt is not None:
            return self.prompt
        for turn in reversed(self.messages):
            if turn.role == "user":
                return turn.text
        return self.messages[-1].text if self.messages else ""

    def features(self) -> list[tuple[str, str]]:
        """The features this request uses, each with the first field that asks for it."""
        used: dict[str, str] = {}
        if self.tools:
            used[TOOLS] = "tools"
        for index, turn in enumerate(self.messages):
            if turn.tool_calls:
                used.setdefault(TOOLS, f"messages.{index}.tool_calls")
            if turn.tool_call_id is not None:
                used.setdefault(TOOLS, f"messages.{index}.tool_call_id")
            if isinstance(turn.content, tuple):
                for part_index, part in enumerate(turn.content):
                    if isinstance(part, ImagePart):
                        used.setdefault(IMAGES, f"messages.{index}.content.{part_index}")
        if self.response_format is not None and self.response_format.get("type") != "text":
            used[RESPONSE_FORMAT] = "response_format"
        if self.seed is not None:
            used[SEED] = "seed"
        if self.reasoning_effort is not None:
            used[REASONING_EFFORT] = "reasoning_effort"
        if self.frequency_penalty is not None:
            used[PENALTIES] = "frequency_penalty"
        elif self.presence_penalty is not None:
            used[PENALTIES] = "presence_penalty"
        return list(used.items())


def refusal(backend: object, request: GenerationRequest) -> str | None:
    """Why ``backend`` cannot honour ``request`` (naming the field), or None. A backend
    lists what it supports in ``features``; one without the attribute supports plain text
    only."""
    supported: frozenset[str] = getattr(backend, "features", frozenset())
    for feature, where in request.features():
        if feature not in supported:
            name = getattr(backend, "name", "this")
            return f"{where}: the {name} backend does not support {feature.replace('_', ' ')}"
    return None


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningChunk:
    """A piece of the model's reasoning (an upstream's ``reasoning_content``)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallChunk:
    """A fragment of tool call ``index``: the first of each index carries ``call_id`` and
    ``name``; the ``arguments`` of one index, concatenated, are the call's JSON arguments."""

    index: int
    arguments: str = ""
    call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class FinishChunk:
    """The last chunk, when the backend knows how and why generation ended.

    ``finish_reason`` is passed to the client as is (``stop``, ``length``, ``tool_calls``,
    or a backend's own value). ``None`` usage fields are filled in by the gateway from what
    it counted, except ``cached_tokens``, which only a backend knows.
    """

    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    extra: dict[str, object] = field(default_factory=dict)
    # Set by the router: the route and the deployments tried (``done.route``).
    route: RouteTrace | None = None


Chunk = TokenChunk | ReasoningChunk | ToolCallChunk | FinishChunk


@runtime_checkable
class Backend(Protocol):
    """A backend may also have ``features``, a frozenset of what it honours beyond plain
    text (``TOOLS``, ``IMAGES``, …); a request that uses anything else is refused before it
    reaches the backend. Without the attribute, a backend takes plain text only."""

    name: str

    async def start(self) -> None:
        """Acquire resources (clients, models). Called once before serving."""

    async def aclose(self) -> None:
        """Release resources. Called once at shutdown."""

    async def ready(self) -> bool:
        """Whether the backend can serve now; /readyz reports it."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Generate. The iterator is closed with ``aclose()`` when the gateway stops early."""


class BackendFactory(Protocol):
    def __call__(self, settings: Settings) -> Backend: ...
