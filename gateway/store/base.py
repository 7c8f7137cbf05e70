"""The stream store: where every generation's tokens and terminal frame are kept, so a
client can resume after a reconnect, on this process or another.

Guarantees every implementation gives:

- ``create`` is atomic: of two creates for the same (user, id) exactly one wins, and the
  id stays taken until the stream expires (``GATEWAY_RESUME_TTL_S`` after its last write).
- A writer's batches are stored in the order written; ``follow`` yields every token after
  ``after`` exactly once, in order, then the live tail, then the terminal frame, then stops.
- ``follow`` of a stream whose producing process died, or whose metadata expired without a
  terminal frame, ends with a ``backend_error`` terminal after a bounded wait instead of
  hanging.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StreamMeta:
    user: str
    id: str
    epoch: str
    node: str  # the process producing the stream
    created_at: float  # wall clock, seconds since the epoch
    room: str | None = None


@dataclass(frozen=True, slots=True)
class TokenBatch:
    first_seq: int
    texts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Terminal:
    frame: str  # the encoded terminal frame (done or error)


StreamEvent = TokenBatch | Terminal


class StreamStore(Protocol):
    name: str
    # The least time between two writes of one producing generation: how far a reader of
    # the store (a resume on another process) may lag behind the live stream.
    flush_interval_s: float

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def create(self, meta: StreamMeta) -> bool:
        """Claim (user, id). False when it is taken (running or still resumable)."""

    async def get(self, user: str, stream_id: str) -> StreamMeta | None:
        """The stream's metadata while it can be resumed, else None."""

    async def write(self, meta: StreamMeta, batch: TokenBatch) -> None:
        """Append one batch of consecutive tokens."""

    async def touch(self, meta: StreamMeta) -> None:
        """Restart the TTL of a stream that is running but has written nothing lately."""

    async def finish(self, meta: StreamMeta, terminal: Terminal) -> None:
        """Append the terminal frame; the stream stays readable for the TTL."""

    def follow(self, meta: StreamMeta, after: int) -> AsyncIterator[StreamEvent]:
        """Tokens with seq > ``after``, the live tail, then the terminal frame."""

    async def resumable(self, user: str) -> list[StreamMeta]:
        """The user's streams that can still be resumed, oldest first."""
