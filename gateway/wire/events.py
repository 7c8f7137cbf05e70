"""The typed events of one generation, from the backend to the socket: how it ends
(``Done`` or ``Failed``) and what it used. Stores keep these, not frames; only
``gateway.wire.outbound`` turns them into JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: str
    usage: Usage = Usage()


@dataclass(frozen=True, slots=True)
class Failed:
    code: str  # an ErrorCode's value
    message: str  # shown to the client as is: never a secret or a traceback
    extra: dict[str, Any] = field(default_factory=dict)


Terminal = Done | Failed


def terminal_outcome(terminal: Terminal) -> str:
    """The metrics label of how a generation ended: its finish reason or error code."""
    return terminal.finish_reason if isinstance(terminal, Done) else terminal.code
