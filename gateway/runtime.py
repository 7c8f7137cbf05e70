"""The process's runtime health: how late the event loop runs its timers (loop lag) and how
long each garbage collection stops it, both measured into the metrics. Each is a stall of
every connection at once, which is what a tail latency is made of."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
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
        self._collected = [metrics.gc_collected.labels(str(generation)) for generation in range(3)]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            self._by_generation[generation].observe(time.perf_counter() - self._started)
            if info["collected"]:
                self._collected[generation].inc(info["collected"])

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


# The gen-2 threshold that turns Python's automatic full collections off: it counts
# generation-1 collections, of which there are a few hundred a minute under load.
NEVER = 1 << 30


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class CollectionPolicy:
    """When the process collects garbage.

    Python runs a full collection whenever enough objects have survived into the oldest
    generation, and it scans every live object: with a thousand connections that stops
    the process for tens of milliseconds, at a moment set by allocation, which lands in
    the middle of streams. Instead:

    - after start, everything that exists (the code, the app, the backend and its model) is
      frozen (``gc.freeze``): it lives as long as the process, and is never scanned again.
      Only what existed at start is frozen, once, so the frozen set does not grow;
    - young collections stay automatic: they scan only recent objects and take well under
      a millisecond;
    - full collections run every ``GATEWAY_GC_FULL_COLLECTION_INTERVAL_S`` instead, so
      cyclic garbage that reached the oldest generation is freed within that interval and
      memory stays bounded, while a stall of the whole process happens at most that often;
    - after each of those, the memory freed since goes back to the system (glibc's
      ``malloc_trim``, ``GATEWAY_GC_TRIM_AFTER_COLLECTION``): otherwise RSS stays at the
      high-water mark of the busiest minute for the life of the process.

    Several apps in one process (tests) share the policy: it is applied by the first and
    undone by the last.
    """

    _users = 0
    _saved: tuple[int, int, int] | None = None
    _froze = False

    def __init__(self, freeze_after_start: bool, full_collection_interval_s: float,
                 trim_after_collection: bool = False) -> None:
        self.freeze_after_start = freeze_after_start
        self.interval_s = full_collection_interval_s
        self._trim = malloc_trim() if trim_after_collection else None
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        cls = CollectionPolicy
        if cls._users == 0:
            cls._saved = gc.get_threshold()
            if self.freeze_after_start and gc.get_freeze_count() == 0:
                gc.freeze()
                cls._froze = True
            if self.interval_s > 0:
                young, middle, _ = cls._saved
                gc.set_threshold(young, middle, NEVER)
        cls._users += 1
        if self.interval_s > 0:
            self._loop = asyncio.get_running_loop()
            self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        self._handle = self._loop.call_later(self.interval_s, self._collect)

    def _collect(self) -> None:
        gc.collect()
        if self._trim is not None:
            # Freed memory goes back to the system: after a burst of connections the C
            # allocator otherwise keeps its high-water mark for the life of the process.
            self._trim(0)
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        cls = CollectionPolicy
        cls._users -= 1
        if cls._users == 0:
            if cls._saved is not None:
                gc.set_threshold(*cls._saved)
                cls._saved = None
            if cls._froze:
                gc.unfreeze()
                cls._froze = False
