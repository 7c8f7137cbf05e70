"""What the floor servers share: pacing, the hello frame and the token text."""

from __future__ import annotations

import gc
from typing import NamedTuple

from gateway.backends.synthetic import synthetic_tokens

HELLO = '{"type":"hello","protocol":"floor"}'


class Pacing(NamedTuple):
    """The synthetic backend's schedule: token i at ``ttft_s + i / tokens_per_s`` after
    the request; ``tokens_per_s`` 0 means as fast as possible."""

    tokens_per_s: float
    ttft_s: float


def schedule_tokens(request: dict[str, object]) -> list[str]:
    """The same token texts the gateway's synthetic backend would send for this request."""
    max_tokens = request.get("max_tokens")
    count = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 256
    prompt = request.get("prompt")
    return synthetic_tokens(prompt if isinstance(prompt, str) else "", count)


def freeze_after_start() -> None:
    """The garbage-collection treatment the gateway gives itself (``gateway.runtime``),
    so the floor is the best its stack can do: what exists after start is frozen, and
    only the young generations collect automatically. A floor runs for one benchmark, so
    it needs no scheduled full collection."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1 << 30)
