"""``echo``: streams the prompt back word by word, whitespace kept."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import ClassVar

import anyio
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from config import Settings
from gateway.backends.base import SEED, BackendSettings, Chunk, FinishChunk, GenerationRequest, TokenChunk

_WORD = re.compile(r"\s*\S+\s*|\s+")


def split_words(text: str) -> list[str]:
    """Pieces whose concatenation is exactly ``text``: each word with the whitespace after it."""
    return _WORD.findall(text)


class EchoSettings(BackendSettings):
    """``GATEWAY_ECHO_*``."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_ECHO_")

    # The pause between two words.
    delay_ms: float = Field(default=30.0, ge=0)


class EchoBackend:
    name = "echo"
    settings_model: ClassVar[type[BackendSettings]] = EchoSettings
    # Its answer is the same for any seed, which it thereby honours; tools, images and the
    # other features are refused.
    features = frozenset({SEED})

    def __init__(self, settings: Settings) -> None:
        self.delay_s = settings.backend_settings_as(EchoSettings).delay_ms / 1000.0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def ready(self) -> bool:
        return True

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        words = split_words(request.last_user_text())
        for index, word in enumerate(words[: request.max_tokens]):
            if index and self.delay_s:
                await anyio.sleep(self.delay_s)
            yield TokenChunk(word)
        reason = "length" if len(words) > request.max_tokens else "stop"
        yield FinishChunk(reason, prompt_tokens=len(words), completion_tokens=min(len(words), request.max_tokens))
