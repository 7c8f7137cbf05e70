"""The cluster in one process's memory: the default (``memory://``), for one process.

Streams, limits and control messages live here and nowhere else, so a client can resume
only on this process, and several workers would each count their own limits (the
server refuses ``--workers`` > 1 with this cluster).
"""

from __future__ import annotations

import sys
import time
from array import array
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import anyio

from config import Settings
from gateway.cluster.base import Handler, Health, Lease, SpawnLoop, StreamEvent, StreamMeta, TokenBatch
from gateway.cluster.control import NODE, ROOM, ControlMessage, audience
from gateway.core.liveness import TokenBucket
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import GatewayError, RateLimited
from gateway.wire.events import TEXT, DeltaKind, Terminal, ToolCallDelta


class MemoryCluster:
    name = "memory"
    node_id = "local"
    shared = False

    def __init__(self, settings: Settings) -> None:
        self.store = MemoryStreamStore(settings)
        self.limits = MemoryLimitStore(settings)
        self.backplane = MemoryBackplane(self.node_id)
        self.health = Health()

    async def start(self, spawn: SpawnLoop) -> None:
        spawn("memory store expiry", self.store.expire_loop)

    async def aclose(self) -> None:
        self.store.clear()


def build(settings: Settings, url: str = "memory://") -> MemoryCluster:
    return MemoryCluster(settings)


class MemoryBackplane:
    """Messages are handled at once, in the publisher's task, when this process is their
    audience."""

    name = "memory"

    def __init__(self, node_id: str) -> None:
        self._handler: Handler | None = None
        self.node_id = node_id
        self.rooms: set[str] = set()

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    async def run(self) -> None:
        await anyio.sleep_forever()

    async def publish(self, message: ControlMessage) -> None:
        purpose, name = audience(message)
        if (purpose == NODE and name != self.node_id) or (purpose == ROOM and name not in self.rooms):
            return
        if self._handler is not None:
            self._handler(message)

    async def subscribe_room(self, room: str) -> None:
        self.rooms.add(room)

    async def unsubscribe_room(self, room: str) -> None:
        self.rooms.discard(room)


# What a kept token costs beyond its text: the str object and its slot in a list.
TOKEN_BYTES = 64
# What a kept delta's kind costs, in a stream that has deltas other than text: its slot in
# the list of kinds (the kinds themselves are shared, or, for a tool call's first
# fragment, counted with their id and name).
KIND_BYTES = 8
TOOL_CALL_BYTES = 128
# What a stream costs before its first token.
RECORD_BYTES = 512
# What a finished stream's token costs beyond its text: its end offset.
PACKED_TOKEN_BYTES = 8


def kinds_cost(kinds: Sequence[DeltaKind]) -> int:
    """What keeping these kinds costs (see KIND_BYTES)."""
    return KIND_BYTES * len(kinds) + sum(
        TOOL_CALL_BYTES + len(k.call_id or "") + len(k.name or "")
        for k in kinds if isinstance(k, ToolCallDelta) and (k.call_id or k.name))


@dataclass(eq=False)
class _Record:
    """One stream. While it runs its tokens are a list of strings; once finished they are
    packed into one string and the end offset of each token. A finished stream is kept for
    the resume TTL, and thousands of them as millions of small strings would cost several
    times their text and, freed, leave the heap too fragmented to give back to the system."""

    meta: StreamMeta
    tokens: list[str] = field(default_factory=list)
    packed: str = ""
    ends: array[int] | None = None
    # Each token's kind, from the first batch with one that is not text; None until then.
    kinds: list[DeltaKind] | None = None
    charged: int = RECORD_BYTES  # what this stream counts in the store's budget
    terminal: Terminal | None = None
    expires_at: float = float("inf")  # monotonic; set when the stream finishes
    # Created by the first follower that waits, so a write nobody waits for costs no event.
    changed: anyio.Event | None = None

    def count(self) -> int:
        return len(self.ends) if self.ends is not None else len(self.tokens)

    def texts(self, start: int, end: int) -> tuple[str, ...]:
        ends = self.ends
        if ends is None:
            return tuple(self.tokens[start:end])
        packed = self.packed
        offset = ends[start - 1] if start > 0 else 0
        taken = []
        for index in range(start, end):
            stop = ends[index]
            taken.append(packed[offset:stop])
            offset = stop
        return tuple(taken)

    def pack(self) -> int:
        """Pack the finished stream's tokens; what its texts and offsets cost now."""
        tokens = self.tokens
        ends: array[int] = array("Q")
        total = 0
        for text in tokens:
            total += len(text)
            ends.append(total)
        self.packed = "".join(tokens)
        self.ends = ends
        self.tokens = []
        return sys.getsizeof(self.packed) + PACKED_TOKEN_BYTES * len(ends)


class MemoryStreamStore:
    name = "memory"
    # Nothing reads a producing generation's record: a resume in this process attaches to
    # the generation itself, and no other process shares the memory. Writes can be rare,
    # which saves the flusher's wake-ups (a tenth of the CPU at 1,000 paced streams); the
    # tail and the terminal are still written as soon as production ends.
    flush_interval_s = 1.0
    writes_in_process = True

    def __init__(self, settings: Settings) -> None:
        self.ttl_s = settings.resume_ttl_s
        # A stream holds at most max_tokens tokens: the gateway stops a generation there.
        self.max_tokens = settings.max_tokens
        # Every token kept here counts, twice while its generation runs (the generation
        # keeps its own list, for resumes on this process). Past the budget the oldest
        # finished streams go first; if running ones alone fill it, new ones are refused.
        self.max_bytes = settings.store_max_bytes
        self.used_bytes = 0
        self.evicted = 0
        self._records: dict[tuple[str, str], _Record] = {}
        self._by_user: dict[str, dict[str, _Record]] = {}
        # Finished streams in finish order: every stream gets the same TTL, so they also
        # expire in this order and purging only ever looks at the front.
        self._expiry: deque[tuple[float, tuple[str, str], _Record]] = deque()

    def clear(self) -> None:
        self._records.clear()
        self._by_user.clear()
        self._expiry.clear()
        self.used_bytes = 0

    async def expire_loop(self) -> None:
        """Drop expired streams also while nothing new is written, so that an idle process
        gives their memory back within a tenth of the TTL (at least every second)."""
        interval = max(self.ttl_s / 10, 1.0)
        while True:
            await anyio.sleep(interval)
            self._purge()

    def _purge(self) -> None:
        """Drop the finished streams whose TTL ran out, then, while over the budget, the
        oldest finished ones (a resume of those gets not_found, as after the TTL)."""
        now = time.monotonic()
        expiry = self._expiry
        while expiry and (expiry[0][0] <= now or self.used_bytes > self.max_bytes):
            expires_at, key, record = expiry.popleft()
            if self._records.get(key) is record:
                self._drop(key, record)
                if expires_at > now:
                    self.evicted += 1

    def _drop(self, key: tuple[str, str], record: _Record) -> None:
        del self._records[key]
        self.used_bytes -= record.charged
        streams = self._by_user.get(key[0])
        if streams is not None:
            streams.pop(key[1], None)
            if not streams:
                del self._by_user[key[0]]

    def _live(self, user: str, stream_id: str) -> _Record | None:
        record = self._records.get((user, stream_id))
        if record is None or record.expires_at <= time.monotonic():
            return None
        return record

    async def create(self, meta: StreamMeta) -> bool:
        self._purge()
        key = (meta.user, meta.id)
        if self._live(meta.user, meta.id) is not None:
            return False
        if self.used_bytes + RECORD_BYTES > self.max_bytes:
            raise GatewayError("the server's stream memory is full with running answers; try again shortly",
                               code=ErrorCode.TOO_MANY_STREAMS)
        record = _Record(meta)
        self.used_bytes += RECORD_BYTES
        self._records[key] = record
        self._by_user.setdefault(meta.user, {})[meta.id] = record
        return True

    async def get(self, user: str, stream_id: str) -> StreamMeta | None:
        record = self._live(user, stream_id)
        return record.meta if record is not None else None

    def _notify(self, record: _Record) -> None:
        changed = record.changed
        if changed is not None:
            record.changed = None
            changed.set()

    async def write(self, meta: StreamMeta, batch: TokenBatch) -> None:
        record = self._records.get((meta.user, meta.id))
        if record is None or record.terminal is not None:
            return
        if batch.first_seq != len(record.tokens):
            raise ValueError(f"batch starts at {batch.first_seq}, stream has {len(record.tokens)} tokens")
        room = max(0, self.max_tokens - len(record.tokens))
        texts = batch.texts[:room]
        cost = sum(map(len, texts)) + TOKEN_BYTES * len(texts)
        kinds = record.kinds
        if batch.kinds is not None and kinds is None:
            kinds = record.kinds = [TEXT] * len(record.tokens)
            cost += KIND_BYTES * len(record.tokens)
        if kinds is not None:
            added: tuple[DeltaKind, ...] = batch.kinds[:room] if batch.kinds is not None else (TEXT,) * len(texts)
            kinds.extend(added)
            cost += kinds_cost(added)
        record.tokens.extend(texts)
        cost *= 2
        record.charged += cost
        self.used_bytes += cost
        self._notify(record)

    async def touch(self, meta: StreamMeta) -> None:
        return None  # a running stream does not expire here

    async def finish(self, meta: StreamMeta, terminal: Terminal) -> None:
        record = self._records.get((meta.user, meta.id))
        if record is None or record.terminal is not None:
            return
        record.terminal = terminal
        record.expires_at = time.monotonic() + self.ttl_s
        # The generation's own copy of the tokens is gone with it, and this one is packed:
        # what counts now is the packed texts (and the kinds).
        charged = RECORD_BYTES + record.pack() + (kinds_cost(record.kinds) if record.kinds is not None else 0)
        self.used_bytes += charged - record.charged
        record.charged = charged
        self._expiry.append((record.expires_at, (meta.user, meta.id), record))
        self._notify(record)
        if self.used_bytes > self.max_bytes:
            self._purge()

    async def follow(self, meta: StreamMeta, after: int) -> AsyncIterator[StreamEvent]:
        record = self._records.get((meta.user, meta.id))
        if record is None:
            return
        position = max(after + 1, 0)
        while True:
            end = record.count()
            if position < end:
                kinds = record.kinds
                yield TokenBatch(position, record.texts(position, end),
                                 tuple(kinds[position:end]) if kinds is not None else None)
                position = end
                continue
            if record.terminal is not None:
                yield record.terminal
                return
            # No await between the checks above and this wait, so no write can be missed.
            changed = record.changed
            if changed is None:
                changed = record.changed = anyio.Event()
            await changed.wait()

    async def resumable(self, user: str) -> list[StreamMeta]:
        self._purge()
        metas = [record.meta for record in self._by_user.get(user, {}).values()]
        return sorted(metas, key=lambda m: m.created_at)


def too_many_streams(limit: int) -> GatewayError:
    return GatewayError(f"at most {limit} generations per user at once", code=ErrorCode.TOO_MANY_STREAMS)


class MemoryLimitStore:
    name = "memory"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: dict[str, int] = {}
        self.generations: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}

    async def add_connection(self, user: str) -> Lease | None:
        return self.add_connection_now(user)

    def add_connection_now(self, user: str) -> Lease | None:
        count = self.connections.get(user, 0)
        if count >= self.settings.max_connections_per_user:
            return None
        self.connections[user] = count + 1

        async def release() -> None:
            self._remove_connection(user)

        return Lease(release)

    def _remove_connection(self, user: str) -> None:
        count = self.connections.get(user, 0) - 1
        if count > 0:
            self.connections[user] = count
            return
        self.connections.pop(user, None)
        bucket = self.buckets.get(user)
        if bucket is not None and bucket.full(anyio.current_time()):
            del self.buckets[user]

    async def acquire_generation(self, user: str) -> Lease:
        return self.acquire_generation_now(user)

    def _sweep(self, now: float) -> None:
        """A full bucket says nothing a new one would not: look at the two oldest buckets
        on each generate and drop them if full, so the buckets of users who went quiet do
        not pile up (each is full within burst / rate seconds of its last use)."""
        buckets = self.buckets
        for _ in range(2):
            if not buckets:
                return
            user = next(iter(buckets))
            bucket = buckets.pop(user)
            if not bucket.full(now):
                buckets[user] = bucket  # still counting: to the back of the line

    def acquire_generation_now(self, user: str) -> Lease:
        now = anyio.current_time()
        self._sweep(now)
        running = self.generations.get(user, 0)
        if running >= self.settings.max_streams_per_user:
            raise too_many_streams(self.settings.max_streams_per_user)
        bucket = self.buckets.get(user)
        if bucket is None:
            bucket = TokenBucket(rate_per_s=self.settings.user_generate_rate_per_s,
                                 burst=self.settings.user_generate_burst, now=now)
            self.buckets[user] = bucket
        wait_s = bucket.try_take(now)
        if wait_s > 0:
            raise RateLimited("too many generate requests", retry_after_s=wait_s)
        self.generations[user] = running + 1

        async def release() -> None:
            count = self.generations.get(user, 0) - 1
            if count > 0:
                self.generations[user] = count
            else:
                self.generations.pop(user, None)

        return Lease(release)
