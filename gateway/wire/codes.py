"""Every error code and close code of the protocol, with what a client should do about
each: one table per kind. The SDKs' copies (``gateway/client/``) are checked against it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    DUPLICATE_ID = "duplicate_id"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    PROMPT_TOO_LONG = "prompt_too_long"
    TOO_MANY_STREAMS = "too_many_streams"
    RATE_LIMITED = "rate_limited"
    BACKEND_ERROR = "backend_error"
    BACKEND_TIMEOUT = "backend_timeout"
    SHUTTING_DOWN = "shutting_down"
    TOKEN_EXPIRED = "token_expired"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


# Error codes worth sending the same request again for, after ``retry_after_s`` when the
# frame has one, else with backoff. Every other code means the request itself must change
# (or, for ``internal``, that the server has a bug).
RETRYABLE_ERRORS = frozenset({
    ErrorCode.TOO_MANY_STREAMS,  # once one of yours ends
    ErrorCode.RATE_LIMITED,
    ErrorCode.BACKEND_ERROR,
    ErrorCode.BACKEND_TIMEOUT,
    ErrorCode.SHUTTING_DOWN,  # on another process (reconnect)
    ErrorCode.UNAVAILABLE,
})


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    ABNORMAL = 1006  # no close frame: the connection dropped (never sent, only observed)
    POLICY = 1008  # authentication failed or policy violated
    TOO_BIG = 1009  # a frame larger than GATEWAY_MAX_MESSAGE_BYTES
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013  # connection limit reached
    HEARTBEAT_TIMEOUT = 4000
    TOKEN_EXPIRED = 4001  # reconnect with a fresh credential: the answers resume
    SLOW_CONSUMER = 4003


@dataclass(frozen=True, slots=True)
class CloseRule:
    reconnect: bool  # whether a client should reconnect (with backoff) after this close
    meaning: str  # what a client may show a person


CLOSE_RULES: dict[int, CloseRule] = {
    CloseCode.NORMAL: CloseRule(False, "closed normally"),
    CloseCode.GOING_AWAY: CloseRule(True, "the server is shutting down"),
    CloseCode.ABNORMAL: CloseRule(True, "the connection dropped (network), or the server refused the handshake"),
    CloseCode.POLICY: CloseRule(False, "authentication refused, or policy violated"),
    CloseCode.TOO_BIG: CloseRule(False, "a message was larger than the server accepts"),
    CloseCode.INTERNAL: CloseRule(True, "internal server error"),
    CloseCode.TRY_AGAIN_LATER: CloseRule(True, "the server is full or this user has too many connections"),
    CloseCode.HEARTBEAT_TIMEOUT: CloseRule(True, "heartbeat timeout: nothing was heard for too long"),
    CloseCode.TOKEN_EXPIRED: CloseRule(True, "the access token expired: reconnect with a fresh one"),
    CloseCode.SLOW_CONSUMER: CloseRule(True, "slow consumer: messages were not read fast enough"),
}


def should_reconnect(code: int | None) -> bool:
    """Whether a close with ``code`` is worth a reconnect. None (a drop without a close
    frame) and codes this table does not know (a proxy's own) are."""
    rule = CLOSE_RULES.get(code) if code is not None else None
    return rule is None or rule.reconnect


def describe_close(code: int | None, reason: str = "") -> str:
    shown = code or CloseCode.ABNORMAL
    rule = CLOSE_RULES.get(shown)
    text = rule.meaning if rule is not None else "closed"
    return f"{int(shown)}: {text}" + (f" ({reason})" if reason else "")
