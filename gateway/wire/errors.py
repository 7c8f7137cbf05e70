"""The gateway's exceptions, and the one place where any exception becomes a wire error
(``failure``): a ``GatewayError`` keeps its code and message, anything else becomes
``internal`` with a generic message, so no traceback or secret ever reaches a client."""

from __future__ import annotations

from typing import Any

from gateway.wire.codes import ErrorCode
from gateway.wire.events import Failed


class GatewayError(Exception):
    """An error that is reported to the client as an ``error`` frame.

    ``message`` is shown to the client as is: it must never contain a secret, a token
    or a traceback.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None, **extra: Any) -> None:
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


class RetryLater(GatewayError):
    """A part the gateway depends on (the cluster store, its backplane) is unreachable
    right now: the request was fine, and is worth sending again after ``retry_after_s``."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, retry_after_s=round(retry_after_s, 3))


class BackendError(GatewayError):
    code = ErrorCode.BACKEND_ERROR


class BackendTimeout(GatewayError):
    code = ErrorCode.BACKEND_TIMEOUT


class FrameError(GatewayError):
    """An inbound frame that could not be parsed; ``stream_id`` is set when it named one."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.BAD_REQUEST, stream_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.stream_id = stream_id


class AuthError(Exception):
    """A rejected credential. ``reason`` is a short label for metrics and logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Unavailable(Exception):
    """A dependency of the process (the cluster store, its backplane) cannot be reached
    right now. The message names what, never a credential."""


def failure(exc: BaseException) -> Failed:
    """The wire error an exception becomes."""
    if isinstance(exc, GatewayError):
        return Failed(str(exc.code), exc.message, dict(exc.extra))
    return Failed(str(ErrorCode.INTERNAL), "internal error")
