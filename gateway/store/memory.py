"""In-process stream store: a bounded record per generation, for a single process."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from config import Settings
from gateway.store.base import StreamEvent, StreamMeta, Terminal, TokenBatch


@dataclass(eq=False)
class _Record:
    meta: StreamMeta
    tokens: list[str] = field(default_factory=list)
    terminal: str | None = None
    expires_at: float = float("inf")  # monotonic; set when the stream finishes
    # Created by the first follower that waits, so a write nobody waits for costs no event.
    changed: anyio.Event | None = None


class MemoryStreamStore:
    name = "memory"
    # Nothing reads a producing generation's record: a resume in this process attaches to
    # the generation itself, and no other process shares the memory. Writes can be rare,
    # which saves the flusher's wake-ups (a tenth of the CPU at 1,000 paced streams); the
    # tail and the terminal are still written as soon as production ends.
    flush_interval_s = 1.0

    def __init__(self, settings: Settings) -> None:
        self.ttl_s = settings.resume_ttl_s
        # A stream holds at most max_tokens tokens: the gateway stops a generation there.
        self.max_tokens = settings.max_tokens
        self._records: dict[tuple[str, str], _Record] = {}
        self._by_user: dict[str, dict[str, _Record]] = {}
        # Finished streams in finish order: every stream gets the same TTL, so they also
        # expire in this order and purging only ever looks at the front.
        self._expiry: deque[tuple[float, tuple[str, str], _Record]] = deque()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._records.clear()

    def _purge(self) -> None:
        now = time.monotonic()
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, key, record = expiry.popleft()
            if self._records.get(key) is record:
                del self._records[key]
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
        record = _Record(meta)
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
        record.tokens.extend(batch.texts[: max(0, self.max_tokens - len(record.tokens))])
        self._notify(record)

    async def touch(self, meta: StreamMeta) -> None:
        return None  # a running stream does not expire here

    async def finish(self, meta: StreamMeta, terminal: Terminal) -> None:
        record = self._records.get((meta.user, meta.id))
        if record is None or record.terminal is not None:
            return
        record.terminal = terminal.frame
        record.expires_at = time.monotonic() + self.ttl_s
        self._expiry.append((record.expires_at, (meta.user, meta.id), record))
        self._notify(record)

    async def follow(self, meta: StreamMeta, after: int) -> AsyncIterator[StreamEvent]:
        record = self._records.get((meta.user, meta.id))
        if record is None:
            return
        position = max(after + 1, 0)
        while True:
            if position < len(record.tokens):
                texts = tuple(record.tokens[position:])
                yield TokenBatch(position, texts)
                position += len(texts)
                continue
            if record.terminal is not None:
                yield Terminal(record.terminal)
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
