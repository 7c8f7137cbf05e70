"""Supervision of the process's background loops: a loop that fails is logged and restarted
with jittered backoff, so no listener or timer dies silently."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import anyio

from gateway.wire.errors import Unavailable

logger = logging.getLogger("gateway.supervise")

# Failures of a dependency that comes and goes: logged in one line, without a traceback.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (Unavailable, OSError, TimeoutError)


async def supervise(name: str, loop: Callable[[], Awaitable[None]], on_failure: Callable[[], None] = lambda: None,
                    max_backoff_s: float = 5.0) -> None:
    """Run ``loop`` forever, restarting it with jittered backoff when it returns or fails."""
    backoff = 0.1
    while True:
        started = anyio.current_time()
        try:
            await loop()
        except EXPECTED_FAILURES as exc:
            on_failure()
            logger.warning("%s: %s; restarting in %.1fs", name, type(exc).__name__, backoff)
        except Exception:
            on_failure()
            logger.exception("%s failed; restarting in %.1fs", name, backoff)
        if anyio.current_time() - started > 30:
            backoff = 0.1  # it ran fine for a while: this is a new outage
        await anyio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, max_backoff_s)
