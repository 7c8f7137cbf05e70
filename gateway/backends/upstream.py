"""What an OpenAI-compatible upstream's answers mean: its finish reasons, its
``Retry-After`` (in any of the forms servers send), and the human part of an error body,
with every secret masked before it may reach a client."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime

DETAIL_CHARS = 160
DEFAULT_RETRY_AFTER_S = 1.0

FINISH_REASONS = {
    "stop": "stop",
    "eos": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "end_turn": "stop",
    "length": "length",
    "max_tokens": "length",
    "model_length": "length",
    "abort": "cancelled",
    "aborted": "cancelled",
    "cancelled": "cancelled",
    "canceled": "cancelled",
}


def map_finish_reason(reason: str) -> str:
    """The gateway's ``stop``/``length``/``cancelled`` for their upstream synonyms; any
    other value (``tool_calls``, ``content_filter``, …) passes through unchanged."""
    return FINISH_REASONS.get(reason, reason)


_TOKEN_LIKE = re.compile(
    r"(?i)\bbearer\s+\S+"
    r"|\b(?:sk|pk|rk|hf|gsk|key)[-_][A-Za-z0-9_\-]{6,}"
    r"|[A-Za-z0-9_\-+/=]{32,}"
)


def sanitize(text: str, secrets: Sequence[str], *, limit: int = DETAIL_CHARS) -> str:
    """A short single-line excerpt of upstream text that cannot carry a secret.

    Known secrets are removed first, then anything that looks like a credential, then the
    text is shortened. If any 8-character piece of a secret is still there (an upstream that
    escaped or split it), the whole excerpt is dropped.
    """
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    text = _TOKEN_LIKE.sub("[redacted]", text)
    text = "".join(ch for ch in " ".join(text.split()) if ch.isprintable())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    for secret in secrets:
        width = min(8, len(secret))
        if any(secret[i : i + width] in text for i in range(len(secret) - width + 1)):
            return ""
    return text


def retry_after_seconds(headers: Mapping[str, str]) -> float:
    """The upstream's hint: ``Retry-After`` (seconds or an HTTP date), ``retry-after-ms``,
    or OpenAI's ``x-ratelimit-reset-*`` durations (``1s``, ``6m0s``, ``20ms``)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return _clamp(float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return _clamp(float(value))
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                from datetime import UTC, datetime

                return _clamp((when - datetime.now(UTC)).total_seconds())
    resets = [_duration(headers.get(name, "")) for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
    known = [reset for reset in resets if reset is not None]
    return _clamp(max(known)) if known else DEFAULT_RETRY_AFTER_S


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _clamp(seconds: float) -> float:
    if math.isnan(seconds):
        return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), 3600.0)


def error_text(raw: str) -> str:
    """The human part of an upstream error body: ``error.message``, ``message`` or
    ``detail`` of a JSON body; nothing from other bodies (proxy pages, HTML)."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return ""
    if not isinstance(payload, dict):
        return ""
    error = payload.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return message if isinstance(message, str) else ""
    for key in ("message", "detail", "error"):
        value = payload.get(key)
        if isinstance(value, str):
            return value
    return ""
