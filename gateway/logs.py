"""Logging setup. Every handler redacts credentials.

uvicorn logs WebSocket request paths with their query string (``uvicorn.error`` at INFO,
even with access logs off), so a ``?token=`` would leak there: the redaction filter sits on
the handlers, where it sees every record of every logger, uvicorn's included.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_PATTERNS = (
    (re.compile(r"(?i)([?&](?:access_)?token=)[^&\s\"']+"), r"\1[redacted]"),
    (re.compile(r"(?i)(bearer[ .])[A-Za-z0-9\-_=]+\.[A-Za-z0-9\-_=]+\.?[A-Za-z0-9\-_.+/=]*"), r"\1[redacted]"),
    (re.compile(r"\beyJ[A-Za-z0-9\-_=]+\.[A-Za-z0-9\-_=]+\.[A-Za-z0-9\-_.+/=]*"), "[redacted-jwt]"),
)


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message with credentials removed. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The one deliberate exception: the development token logged at start when no key
        # is configured and GATEWAY_ENV=dev, marked with extra={"dev_token": True}.
        if getattr(record, "dev_token", False):
            return True
        # The websockets protocol logs every frame at DEBUG (to uvicorn.error): data frames
        # carry prompts and tokens, so they are dropped; control frames are kept.
        if record.levelno == logging.DEBUG and record.msg in ("< %s", "> %s") and record.args:
            frame = record.args[0] if isinstance(record.args, tuple) else None
            if getattr(getattr(frame, "opcode", None), "name", "") in ("TEXT", "BINARY", "CONT"):
                return False
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the formatter to report
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        if record.exc_info and not record.exc_text:
            # Format the traceback here, redacted; formatters reuse exc_text as it is.
            record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info))
        return True


_TRACEBACKS = logging.Formatter()


def logging_config(level: str = "info", *, access_log: bool = False) -> dict[str, Any]:
    level_name = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactingFilter}},
        "formatters": {
            "default": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["redact"],
                "stream": "ext://sys.stderr",
            },
        },
        # Every other library's records (redis, aiohttp, asyncio, …) go through the same
        # redacting handler.
        "root": {"level": "WARNING", "handlers": ["default"]},
        "loggers": {
            "gateway": {"level": level_name, "handlers": ["default"], "propagate": False},
            "uvicorn": {"level": level_name, "handlers": ["default"], "propagate": False},
            "uvicorn.error": {"level": level_name, "handlers": ["default"], "propagate": False},
            "uvicorn.access": {
                "level": level_name if access_log else "WARNING",
                "handlers": ["default"],
                "propagate": False,
            },
        },
    }
