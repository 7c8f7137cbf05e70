"""The process's runtime health: how late the event loop runs its timers (loop lag) and how
long each garbage collection stops it, both measured into the metrics. Each is a stall of
every connection at once, which is what a tail latency is made of."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from gateway.metrics import Metrics

# How often the loop-lag probe asks to be woken. A stall shorter than this can be missed;
# one longer is always seen.
LAG_PROBE_INTERVAL_S = 0.05


class LoopLagProbe:
    """A timer callback, not a task: it asks to run every ``LAG_PROBE_INTERVAL_S`` and
    records how late it ran. Costs one timer handle and twenty wake-ups a second."""

    def __init__(self, metrics: Metrics, interval_s: float = LAG_PROBE_INTERVAL_S) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule(self._loop.time())

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        due = now + self.interval_s
        self._handle = self._loop.call_at(due, self._ran, due)

    def _ran(self, due: float) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.metrics.loop_lag.observe(max(now - due, 0.0))
        self._schedule(now)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class GCPauses:
    """Records the duration of every garbage collection, by generation."""

    def __init__(self, metrics: Metrics) -> None:
        self._by_generation = [metrics.gc_pause.labels(str(generation)) for generation in range(3)]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
