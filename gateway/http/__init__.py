"""The OpenAI-compatible HTTP API (``/v1/chat/completions``, ``/v1/models``): the same
generations, limits, metrics and resume as the WebSocket protocol, for clients that speak
Chat Completions over HTTP with server-sent events (see docs/http.md)."""

from __future__ import annotations

from gateway.http.api import install

__all__ = ["install"]
