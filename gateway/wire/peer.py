"""The client's side of the protocol's JSON: what a client sends, encoded, and what it
receives, decoded. The Python client (``gateway.client``) speaks through these."""

from __future__ import annotations

from typing import Any

import orjson


def encode_client_frame(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def decode_server_frame(text: str | bytes) -> dict[str, Any] | None:
    """The frame as an object, or None when it is not a JSON object (a frame this client
    does not understand is skipped, not fatal)."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) else None
