"""The types a caller of the client meets besides ``Generation``: how to authenticate, where
a token comes from, the connection's states and their changes, and the client's one error."""

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
