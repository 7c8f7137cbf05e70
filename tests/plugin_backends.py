"""Backends loaded by the tests through ``GATEWAY_BACKEND=tests.plugin_backends:…``.

They record, per stream id, when generation started and when the gateway closed the
iterator, with thread-safe events, because the server under test runs in its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from config import Settings
from gateway.backends import Chunk, FinishChunk, GenerationRequest, TokenChunk
from gateway.wire.errors import BackendError


@dataclass
class Record:
    started: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)
    closed_at: float = 0.0
    tokens: int = 0


RECORDS: dict[str, Record] = {}


def record(stream_id: str) -> Record:
    return RECORDS.setdefault(stream_id, Record())


class _Base:
    name = "test"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def ready(self) -> bool:
        return True


class TickingBackend(_Base):
    """``tick0 tick1 …`` one token every 20 ms, up to max_tokens; records close."""

    interval_s = 0.02

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        rec = record(request.id)
        rec.started.set()
        try:
            for index in range(request.max_tokens):
                await anyio.sleep(self.interval_s)
                rec.tokens += 1
                yield TokenChunk(f"tick{index} ")
            yield FinishChunk("stop")
        finally:
            rec.closed_at = time.monotonic()
            rec.closed.set()


class SilentBackend(_Base):
    """Never produces a token: a model stuck before its first token."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        rec = record(request.id)
        rec.started.set()
        try:
            await anyio.sleep_forever()
            yield TokenChunk("never")
        finally:
            rec.closed_at = time.monotonic()
            rec.closed.set()


class FailingBackend(_Base):
    """Two tokens, then an upstream fault; a prompt of ``crash`` raises a plain exception
    whose text must never reach the client."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        yield TokenChunk("one ")
        yield TokenChunk("two ")
        if request.last_user_text() == "crash":
            raise RuntimeError("secret internal detail /etc/passwd")
        raise BackendError("upstream failed", upstream_status=502)


class NotABackend:
    def __init__(self, settings: Settings) -> None:
        pass


class UsageBackend(_Base):
    """Honours max_tokens and reports the upstream's usage, as an OpenAI-compatible server
    does, counting two model tokens per chunk."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        for index in range(request.max_tokens):
            yield TokenChunk(f"w{index} ")
        yield FinishChunk("length", prompt_tokens=7, completion_tokens=2 * request.max_tokens)


class BrokenAtStart(_Base):
    """A backend that cannot start (a model that will not load): a worker using it dies."""

    async def start(self) -> None:
        raise RuntimeError("the model cannot be loaded")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        yield FinishChunk("stop")
