"""Every wire error code and WebSocket close code the gateway uses, in one place.

Exceptions raised anywhere in the gateway are turned into wire errors only by
``GatewayError.to_frame`` (via ``gateway.protocol.encode_error``) in the connection
handler; an exception that is not a ``GatewayError`` becomes ``internal`` with a generic
message, so no traceback or secret ever reaches a client.
"""

from __future__ import annotations

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
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes. ``should_retry`` tells a client whether to reconnect."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    POLICY = 1008  # authentication failed or policy violated
    TOO_BIG = 1009  # a frame larger than GATEWAY_MAX_MESSAGE_BYTES
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013  # connection limit reached
    HEARTBEAT_TIMEOUT = 4000
    SLOW_CONSUMER = 4003

    @property
    def should_retry(self) -> bool:
        return self not in _DO_NOT_RETRY


_DO_NOT_RETRY = frozenset({CloseCode.NORMAL, CloseCode.POLICY, CloseCode.TOO_BIG})


class GatewayError(Exception):
    """An error that is reported to the client as an ``error`` frame.

    ``message`` is shown to the client as is: it must never contain a secret, a token
    or a traceback.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None, **extra: object) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra


class BadRequest(GatewayError):
    code = ErrorCode.BAD_REQUEST


class RateLimited(GatewayError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=round(retry_after_s, 3))


class BackendError(GatewayError):
    code = ErrorCode.BACKEND_ERROR


class BackendTimeout(GatewayError):
    code = ErrorCode.BACKEND_TIMEOUT


class AuthError(Exception):
    """A rejected credential. ``reason`` is a short label for metrics and logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Unavailable(Exception):
    """A dependency of the process (Redis, the stream store) cannot be reached right now."""


class RedisUnavailable(Unavailable, RuntimeError):
    """Redis could not be reached at start; the message names the URL without its password."""
