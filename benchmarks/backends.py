"""A benchmark backend: the synthetic backend, except that a request whose ``model`` is
``"full-speed"`` ignores the pacing.

Scenario 5 needs clients that never read while they are sent tokens as fast as the
gateway can produce them (so their queues and socket buffers fill within seconds), beside
healthy streams paced like an LLM; the synthetic backend's pacing is one setting for the
whole process, so this picks it per request. Select it with
``GATEWAY_BACKEND=benchmarks.backends:PacedOrFullSpeed``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from config import Settings
from gateway.backends.base import Chunk, GenerationRequest
from gateway.backends.synthetic import SyntheticBackend

FULL_SPEED_MODEL = "full-speed"


class PacedOrFullSpeed(SyntheticBackend):
    name = "synthetic"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._full_speed = SyntheticBackend(
            settings.model_copy(update={"synthetic_tokens_per_s": 0.0, "synthetic_ttft_ms": 0.0})
        )

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.model == FULL_SPEED_MODEL:
            return self._full_speed.stream(request)
        return super().stream(request)
