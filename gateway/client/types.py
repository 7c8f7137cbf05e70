"""The types a caller of the client meets besides ``Generation``: how to authenticate, where
a token comes from, the connection's states and their changes, the typed parts of an
answer, and the client's one error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

AuthMode = Literal["subprotocol", "header", "query", "message"]
TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]
State = Literal["connecting", "open", "reconnecting", "closed"]


@dataclass(frozen=True, slots=True)
class StateChange:
    state: State
    code: int | None = None  # the close code that caused it, when there was one
    reason: str = ""
    delay_s: float | None = None  # for "reconnecting": when the next attempt starts
    opened: bool = False  # for "reconnecting"/"closed": whether the lost connection had said hello


class GatewayError(Exception):
    """The client cannot continue: the token was refused or the client was closed."""


@dataclass(frozen=True, slots=True)
class TextPart:
    """A piece of the answer's text."""

    text: str
    kind: Literal["text"] = "text"


@dataclass(frozen=True, slots=True)
class ReasoningPart:
    """A piece of the model's reasoning."""

    text: str
    kind: Literal["reasoning"] = "reasoning"


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    """A fragment of tool call ``index``: ``call_id`` and ``name`` on its first fragment
    only; the ``arguments`` of one index, concatenated, are the call's JSON arguments."""

    index: int
    arguments: str
    call_id: str | None = None
    name: str | None = None
    kind: Literal["tool_call"] = "tool_call"


Part = TextPart | ReasoningPart | ToolCallPart
