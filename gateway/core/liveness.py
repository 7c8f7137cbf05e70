"""Per-connection deadlines, with the clock injected: no I/O and no sleeping here.

One timer per process (the hub's) keeps every connection in a ``Deadlines`` heap keyed by
``Liveness.next_deadline()`` and calls ``poll(now)`` when a connection's deadline passes;
``poll`` says what is due. Everything that moves a deadline (an inbound frame, the send
queue filling or draining) is reported with the time it happened, so tests drive it with
plain numbers.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable
from enum import Enum
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Due(Enum):
    SEND_PING = "send_ping"
    STALE = "stale"  # no sign of life for heartbeat_timeout_s: close 4000
    TOKEN_EXPIRED = "token_expired"  # the credential ran out: error frame, close 4001
    SLOW_CONSUMER = "slow_consumer"  # queue full for slow_consumer_timeout_s: close 4003


class Liveness:
    __slots__ = (
        "heartbeat_interval_s",
        "heartbeat_timeout_s",
        "last_inbound",
        "next_ping_at",
        "queue_full_since",
        "slow_consumer_timeout_s",
        "token_expires_at",
    )

    def __init__(
        self,
        *,
        now: float,
        heartbeat_interval_s: float,
        heartbeat_timeout_s: float,
        slow_consumer_timeout_s: float,
        token_expires_at: float | None = None,
    ) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.slow_consumer_timeout_s = slow_consumer_timeout_s
        self.token_expires_at = token_expires_at
        self.last_inbound = now
        self.next_ping_at = now + heartbeat_interval_s
        self.queue_full_since: float | None = None

    def inbound(self, now: float) -> None:
        """Any frame from the client, including protocol-level pongs, is a sign of life."""
        if now > self.last_inbound:
            self.last_inbound = now

    def queue_full(self, now: float) -> bool:
        """Report that a producer found the send queue full. True when this starts the clock."""
        if self.queue_full_since is None:
            self.queue_full_since = now
            return True
        return False

    def queue_drained(self) -> None:
        """Report that the writer took frames from the queue: the client is reading."""
        self.queue_full_since = None

    def stale_at(self) -> float:
        return self.last_inbound + self.heartbeat_timeout_s

    def next_deadline(self) -> float:
        candidates = [self.next_ping_at, self.stale_at()]
        if self.token_expires_at is not None:
            candidates.append(self.token_expires_at)
        if self.queue_full_since is not None:
            candidates.append(self.queue_full_since + self.slow_consumer_timeout_s)
        return min(candidates) if candidates else math.inf

    def poll(self, now: float) -> list[Due]:
        """What is due at ``now``. Closing conditions come first; a ping is listed only
        when nothing closes the connection."""
        due: list[Due] = []
        if self.queue_full_since is not None and now >= self.queue_full_since + self.slow_consumer_timeout_s:
            due.append(Due.SLOW_CONSUMER)
        if now >= self.stale_at():
            due.append(Due.STALE)
        if self.token_expires_at is not None and now >= self.token_expires_at:
            due.append(Due.TOKEN_EXPIRED)
        if due:
            return due
        if now >= self.next_ping_at:
            due.append(Due.SEND_PING)
            # Pings keep a fixed cadence from the last one, not from when the timer woke.
            while self.next_ping_at <= now:
                self.next_ping_at += self.heartbeat_interval_s
        return due


class Deadlines(Generic[K]):
    """When each key is next due, as one heap for any number of keys: a process holding
    10,000 idle connections runs one timer instead of 10,000 sleeping tasks.

    ``schedule`` only ever moves a key's deadline earlier or sets it after ``pop_due``; a
    deadline that moved later (the usual case: an inbound frame postpones staleness) is
    left in place, and the key is simply polled once at the old time and rescheduled.
    Superseded heap entries are skipped when they surface.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def schedule(self, key: K, when: float) -> bool:
        """Make ``key`` due at ``when`` unless it is due earlier already. True when this is
        now the earliest deadline of all (the timer must wake sooner)."""
        current = self._due.get(key)
        if current is not None and current <= when:
            return False
        self._due[key] = when
        heapq.heappush(self._heap, (when, next(self._order), key))
        return self._heap[0][2] is key and self._heap[0][0] == when

    def remove(self, key: K) -> None:
        """Unschedule ``key``. Its entries leave the heap when they surface or, once
        superseded entries outnumber the scheduled keys, at once: an entry holds its key,
        and a connection that ended must not be kept alive until its old deadline."""
        if self._due.pop(key, None) is not None and len(self._heap) > 2 * len(self._due):
            due = self._due
            self._heap = [entry for entry in self._heap if due.get(entry[2]) == entry[0]]
            heapq.heapify(self._heap)

    def next_at(self) -> float:
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def pop_due(self, now: float) -> list[K]:
        """The keys due at ``now``, each once, earliest first; they are no longer scheduled."""
        heap = self._heap
        due = self._due
        out: list[K] = []
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if due.get(key) == when:
                del due[key]
                out.append(key)
        return out


class TokenBucket:
    """A token bucket: ``rate_per_s`` refill, ``burst`` capacity. Time is passed in."""

    def __init__(self, *, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated_at = now

    def _refill(self, now: float) -> None:
        if now > self.updated_at:
            self.tokens = min(self.burst, self.tokens + (now - self.updated_at) * self.rate_per_s)
            self.updated_at = now

    def try_take(self, now: float) -> float:
        """Take one token. Returns 0.0 on success, else the seconds until one is available."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst
