"""``synthetic``: an LLM stand-in for load tests.

Exactly ``max_tokens`` tokens of deterministic text (the text depends only on the prompt
and ``max_tokens``), the first after ``GATEWAY_SYNTHETIC_TTFT_MS``, then paced at
``GATEWAY_SYNTHETIC_TOKENS_PER_S`` against a fixed schedule, so a slow consumer does not
make the backend drift; 0 means as fast as possible.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import ClassVar

import anyio
import anyio.lowlevel
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from config import Settings
from gateway.backends.base import BackendSettings, Chunk, FinishChunk, GenerationRequest, TokenChunk

VOCABULARY = (
    "the model streams tokens over a socket while clients read them as fast as they can and every gateway "
    "keeps its queues bounded so that memory stays flat under load with heartbeats and backpressure working "
    "together quietly in the background of each connection"
).split()

# At full speed, yield to the event loop every this many tokens so other connections run.
_YIELD_EVERY = 32


def iter_synthetic_tokens(prompt: str, count: int) -> Iterator[str]:
    """The deterministic token sequence for ``prompt`` and ``count``, generated lazily so a
    request for millions of tokens costs no memory up front."""
    seed = int.from_bytes(hashlib.blake2b(f"{count}:{prompt}".encode(), digest_size=8).digest(), "big")
    state = seed or 1
    vocabulary = VOCABULARY
    size = len(vocabulary)
    for index in range(count):
        # xorshift64: cheap, deterministic, platform independent.
        state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 7
        state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
        word = vocabulary[state % size]
        yield word if index == 0 else " " + word


def synthetic_tokens(prompt: str, count: int) -> list[str]:
    return list(iter_synthetic_tokens(prompt, count))


class SyntheticSettings(BackendSettings):
    """``GATEWAY_SYNTHETIC_*``."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_SYNTHETIC_")

    # Time to the first token.
    ttft_ms: float = Field(default=200.0, ge=0)
    # Tokens per second after the first; 0: as fast as possible.
    tokens_per_s: float = Field(default=50.0, ge=0)


class SyntheticBackend:
    name = "synthetic"
    settings_model: ClassVar[type[BackendSettings]] = SyntheticSettings

    def __init__(self, settings: Settings) -> None:
        own = settings.backend_settings_as(SyntheticSettings)
        self.ttft_s = own.ttft_ms / 1000.0
        self.tokens_per_s = own.tokens_per_s

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def ready(self) -> bool:
        return True

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        # The gateway runs on asyncio (uvicorn); its sleep and clock are used directly,
        # without anyio's dispatch, because this is the per-token path of every load test.
        clock = asyncio.get_running_loop().time
        prompt = request.last_user_text()
        started = clock()
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        interval = 1.0 / self.tokens_per_s if self.tokens_per_s else 0.0
        first_at = started + self.ttft_s
        for index, text in enumerate(iter_synthetic_tokens(prompt, request.max_tokens)):
            if interval:
                delay = first_at + index * interval - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    await anyio.lowlevel.checkpoint()
            elif index % _YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
            yield TokenChunk(text)
        yield FinishChunk("length", prompt_tokens=len(prompt.split()), completion_tokens=request.max_tokens)
