"""A benchmark backend: the synthetic backend, except that a request whose ``model`` is
``"full-speed"`` gets tokens as fast as the gateway takes them, generated lazily.

Scenario 5 needs clients that never read while they are sent tokens as fast as possible
(so their queues and socket buffers fill within seconds), beside healthy streams paced
like an LLM; the synthetic backend's pacing is one setting for the whole process, so this
picks it per request. The full-speed stream is lazy because the synthetic backend builds
the whole token list when a stream starts (O(max_tokens) memory and CPU up front), which
for 100 never-ending streams would measure that list instead of the gateway's buffers.
Select it with ``GATEWAY_BACKEND=benchmarks.backends:PacedOrFullSpeed``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio.lowlevel

from config import Settings
from gateway.backends.base import Chunk, FinishChunk, GenerationRequest, TokenChunk
from gateway.backends.synthetic import VOCABULARY, SyntheticBackend

FULL_SPEED_MODEL = "full-speed"
_WORDS = [TokenChunk(" " + word) for word in VOCABULARY]
_YIELD_EVERY = 32


class PacedOrFullSpeed(SyntheticBackend):
    name = "synthetic"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.model == FULL_SPEED_MODEL:
            return self._full_speed(request.max_tokens)
        return super().stream(request)

    async def _full_speed(self, count: int) -> AsyncIterator[Chunk]:
        words = len(_WORDS)
        for index in range(count):
            if index % _YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
            yield _WORDS[index % words]
        yield FinishChunk("length", completion_tokens=count)
