"""The cluster parts' interfaces: where streams are kept (``StreamStore``), how per-user
limits are counted (``LimitStore``), how processes tell each other things (``Backplane``),
and the bundle of the three that one process runs (``Cluster``).

Every implementation (``memory.py``, ``redis/``) gives the guarantees written here, and
``tests/test_cluster_parts.py`` checks them against each one.

Stream store guarantees:
- ``create`` is atomic: of two creates for the same (user, id) exactly one wins, and the
  id stays taken until the stream expires: ``GATEWAY_RESUME_TTL_S`` after its terminal,
  and while it runs at least nine tenths of that after its last write.
- A writer's batches are stored in the order written; ``follow`` yields every delta after
  ``after`` exactly once, in order, with its kind, then the live tail, then the terminal
  event, then stops.
- ``follow`` of a stream whose producing process died, or whose metadata expired without a
  terminal, ends with a ``backend_error`` terminal after a bounded wait instead of hanging.

Limits: a granted slot is a ``Lease``; releasing it is the holder's job (in a ``finally``),
and a lease is released by the store that granted it.

Backplane: delivery is at most once and unordered across publishers; from one publisher,
messages to one audience (one node, one room, the broadcasts) arrive in the order
published (there is no order between audiences). A message reaches its audience
(``control.audience``) only: its node's process, every process subscribed to its room
(``subscribe_room``), or every process for a broadcast; the publisher's own process too
when it is in the audience.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.cluster.control import ControlMessage
from gateway.wire.events import DeltaKind, Terminal

# Spawns a supervised background loop in the process's task group: (name, loop).
SpawnLoop = Callable[[str, Callable[[], Awaitable[None]]], None]


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
    """Consecutive deltas from ``first_seq``: their texts, and their kinds (``None`` when
    every one is answer text, the common case, which then costs nothing per delta)."""

    first_seq: int
    texts: tuple[str, ...]
    kinds: tuple[DeltaKind, ...] | None = None


StreamEvent = TokenBatch | Terminal


class StreamStore(Protocol):
    name: str
    # The least time between the starts of two writes of one producing generation that a
    # reader of the store follows (a resume on another process): how far such a reader
    # may lag behind the live stream.
    flush_interval_s: float
    # A write completes without I/O and no other process reads this store: a producing
    # generation then writes its batches itself, between tokens, instead of through a
    # flusher task of its own.
    writes_in_process: bool
    # Streams dropped before their TTL to stay within a memory budget (0 for a store
    # without one).
    evicted: int

    async def create(self, meta: StreamMeta) -> bool:
        """Claim (user, id). False when it is taken (running or still resumable)."""

    async def get(self, user: str, stream_id: str) -> StreamMeta | None:
        """The stream's metadata while it can be resumed, else None."""

    async def write(self, meta: StreamMeta, batch: TokenBatch) -> None:
        """Append one batch of consecutive deltas, kinds included."""

    async def touch(self, meta: StreamMeta) -> None:
        """Restart the TTL of a stream that is running but has written nothing lately."""

    async def finish(self, meta: StreamMeta, terminal: Terminal) -> None:
        """Append the terminal event; the stream stays readable for the TTL."""

    def follow(self, meta: StreamMeta, after: int) -> AsyncIterator[StreamEvent]:
        """Deltas with seq > ``after`` (with their kinds), the live tail, then the terminal
        event."""

    async def resumable(self, user: str) -> list[StreamMeta]:
        """The user's streams that can still be resumed, oldest first."""


class Lease:
    __slots__ = ("_release", "released")

    def __init__(self, release: Callable[[], Awaitable[None]]) -> None:
        self._release = release
        self.released = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await self._release()


class LimitStore(Protocol):
    name: str

    async def add_connection(self, user: str) -> Lease | None:
        """A connection slot for ``user``, or None when the user is at the limit."""

    async def acquire_generation(self, user: str) -> Lease:
        """A generation slot, or raise ``too_many_streams`` / ``rate_limited``."""


Handler = Callable[[ControlMessage], None]


class Backplane(Protocol):
    name: str

    def set_handler(self, handler: Handler) -> None:
        """Register the handler; it is called from the event loop and must not block."""

    async def run(self) -> None:
        """Receive messages until cancelled; raises when the connection fails (the
        caller supervises and restarts it)."""

    async def publish(self, message: ControlMessage) -> None:
        """Send to the message's audience. Raises when the backplane is unreachable."""

    async def subscribe_room(self, room: str) -> None:
        """Receive the room's messages from now on (the first member here joined). Returns
        once the subscription is in place, or when the backplane is down (it subscribes
        again when it is back)."""

    async def unsubscribe_room(self, room: str) -> None:
        """Stop receiving the room's messages (the last member here left): none published
        after it returns arrives (unless the backplane could not reach Redis)."""


class Health:
    """Whether the cluster's shared parts answer right now, with a callback on change."""

    __slots__ = ("on_change", "up")

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.on_change: Callable[[bool], None] = lambda up: None

    def report(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self.on_change(up)


class Cluster(Protocol):
    """What one process shares with the others: its parts, its identity among them and
    whether they answer. ``shared`` is False when this process is the whole cluster
    (memory): several workers would then not see each other's streams and limits."""

    name: str
    node_id: str
    shared: bool
    store: StreamStore
    limits: LimitStore
    backplane: Backplane
    health: Health

    async def start(self, spawn: SpawnLoop) -> None:
        """Connect (raise ``Unavailable`` when that fails) and start the background loops
        the parts need (the backplane's listener, liveness) with ``spawn``."""

    async def aclose(self) -> None: ...
