"""The typed events of one generation, from the backend to the socket: the kind of each
delta it streams (answer text, reasoning, a tool call's fragment), how it ends (``Done`` or
``Failed``) and what it used. Stores keep these, not frames; only ``gateway.wire.outbound``
turns them into JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

# The kinds of the deltas of one generation, which share one ``seq`` space. A delta is its
# text (for a tool call, a fragment of the arguments) and its kind: ``TEXT``, ``REASONING``
# or a ``ToolCallDelta``.
TEXT: Final[Literal["text"]] = "text"
REASONING: Final[Literal["reasoning"]] = "reasoning"


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """The kind of a tool-call fragment: the call's ``index`` in the answer, and on the
    first fragment of that index only, the call's id and the function's name."""

    index: int
    call_id: str | None = None
    name: str | None = None


DeltaKind = Literal["text", "reasoning"] | ToolCallDelta


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Only when the backend reports them (an upstream's completion_tokens_details and
    # prompt_tokens_details), or, for reasoning, when the gateway counted reasoning deltas.
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class RouteTrace:
    """Where a routed generation ran: the route the client asked for and the deployments
    tried, in order; the last one finished the answer."""

    name: str
    deployments: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: str
    usage: Usage = Usage()
    route: RouteTrace | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    code: str  # an ErrorCode's value
    message: str  # shown to the client as is: never a secret or a traceback
    extra: dict[str, Any] = field(default_factory=dict)


Terminal = Done | Failed


def terminal_outcome(terminal: Terminal) -> str:
    """The metrics label of how a generation ended: its finish reason or error code."""
    return terminal.finish_reason if isinstance(terminal, Done) else terminal.code
