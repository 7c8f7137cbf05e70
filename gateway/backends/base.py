"""The generator backend interface.

A backend turns one ``GenerationRequest`` into an asynchronous iterator of chunks:
``TokenChunk`` for each piece of text, optionally one ``FinishChunk`` at the end with the
finish reason and usage. Guarantees the gateway relies on:

- chunks come in generation order, and the concatenated ``TokenChunk.text`` is the answer;
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
from typing import Protocol, runtime_checkable

from config import Settings
from config.backends import BackendSettings as BackendSettings


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


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

    def last_user_text(self) -> str:
        """The prompt, or the content of the last user message."""
        if self.prompt is not None:
            return self.prompt
        for turn in reversed(self.messages):
            if turn.role == "user":
                return turn.content
        return self.messages[-1].content if self.messages else ""


@dataclass(frozen=True, slots=True)
class TokenChunk:
    text: str


@dataclass(frozen=True, slots=True)
class FinishChunk:
    """The last chunk, when the backend knows how and why generation ended.

    ``finish_reason`` is passed to the client as is (``stop``, ``length``, or a backend's
    own value). ``None`` usage fields are filled in by the gateway from what it counted.
    """

    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


Chunk = TokenChunk | FinishChunk


@runtime_checkable
class Backend(Protocol):
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
