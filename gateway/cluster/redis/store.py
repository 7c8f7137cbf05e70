"""Stream store in Redis: one Redis Stream per generation, capped, with a TTL.

Keys (prefix ``GATEWAY_REDIS_PREFIX`` then ``v3:``; the user is the hash tag, so a user's
keys share one cluster slot):
- ``{<user>}:m:<id>``: the stream's metadata (JSON), created with SET NX: the id claim;
- ``{<user>}:s:<id>``: the Redis Stream; one entry per batch of deltas (``f`` first seq,
  ``t`` JSON list of texts, and ``k`` a JSON list of their kinds in the compact form of
  ``gateway.cluster.control.kind_to_wire``, only when some delta is not answer text) and
  one terminal entry (``e`` the terminal event as JSON);
- ``{<user>}:u``: a sorted set of the user's stream ids by creation time, for ``hello``.

``create`` is one round trip. Writes of every generation of the process go through one
group commit (``commit.py``): one pipeline per flush interval, one XADD per generation
that has new tokens. The TTLs are set at create (metadata, index), with a stream's first
XADD (its key) and with its terminal (the stream and its metadata; the index's TTL is a
tenth longer, so it outlives them), and refreshed at least every tenth of the TTL in
between, so a paced stream costs about one command per write, and the
generation decides how often it writes (``gateway.store_writer``).
Followers read what is stored, then the live tail through the process's tailing reads
(``tailer.py``). After a commit that wrote streams followed on other processes, one
pipeline of ``SPUBLISH`` tells each of those processes which of its streams have new
entries (on its node channel); a commit also wakes this process's own tailer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from redis.exceptions import RedisClusterException, RedisError

from config import Settings
from gateway.cluster.base import StreamEvent, StreamMeta, TokenBatch
from gateway.cluster.control import FollowNotice, kind_from_wire, kind_to_wire, terminal_from_dict, terminal_to_dict
from gateway.cluster.redis.backplane import written_payload
from gateway.cluster.redis.commit import GroupCommit
from gateway.cluster.redis.context import RedisContext
from gateway.cluster.redis.tailer import TAIL_COUNT, Entry, StreamTailer
from gateway.wire.codes import ErrorCode
from gateway.wire.events import Failed, Terminal

logger = logging.getLogger("gateway.redis")

# How long a follower waits for the tail before checking that the producer is alive.
FOLLOW_IDLE_CHECK_S = 1.0
# The newest ids kept in a user's index (what hello lists as resumable).
USER_INDEX_MAX = 200
# A running stream's TTLs are set again once this fraction of the TTL has passed.
TTL_REFRESH_FRACTION = 0.1
# Running streams whose TTL state is kept; past it the state is forgotten (and rebuilt).
TTL_TRACKED_MAX = 100_000
# Running streams of this process with followers elsewhere that are remembered.
FOLLOWED_MAX = 100_000


@dataclass(frozen=True, slots=True)
class _Write:
    meta: StreamMeta
    fields: dict[str, str] | None  # None: only the TTLs
    final: bool


class RedisStreamStore:
    name = "redis"
    # Redis keeps its own memory (maxmemory and an eviction policy of its own).
    evicted = 0
    writes_in_process = False

    def __init__(self, settings: Settings, context: RedisContext) -> None:
        self.ctx = context
        self.ttl_s = max(int(settings.resume_ttl_s), 1)
        # The user's index outlives the TTL by the refresh period: set at create and at each
        # refresh while a stream runs, it then lasts past every stream's own expiry without
        # being set again at the terminal.
        self.user_ttl_s = self.ttl_s + max(int(self.ttl_s * TTL_REFRESH_FRACTION), 1)
        # Entries hold at least one token, so max_tokens + 1 entries is the whole stream.
        self.max_entries = settings.max_tokens + 1
        self.flush_interval_s = settings.store_flush_interval_s
        self.commit: GroupCommit[_Write] = GroupCommit(self._execute, settings.store_flush_interval_s)
        self.tailer = StreamTailer(context)
        # Running streams of this process, by (user, id): when their TTLs were last all set
        # (monotonic), and whether their stream key has one yet.
        self._ttl_set: dict[tuple[str, str], tuple[float, bool]] = {}
        # Streams of this process followed on other processes: the processes, by stream key,
        # from their follow notices until the stream's terminal.
        self._followers: dict[str, set[str]] = {}
        # "written" notices sent, for tests and benchmarks.
        self.notices = 0

    def _meta_key(self, user: str, stream_id: str) -> str:
        return self.ctx.user_key(user, "m", stream_id)

    def _stream_key(self, user: str, stream_id: str) -> str:
        return self.ctx.user_key(user, "s", stream_id)

    def _user_key(self, user: str) -> str:
        return self.ctx.user_key(user, "u")

    def followed_from(self, notice: FollowNotice) -> None:
        """A follow notice for a stream of this process: tell its follower's process when
        the stream has new entries."""
        if notice.node != self.ctx.node_id or notice.follower == self.ctx.node_id:
            return
        if (notice.user, notice.id) not in self._ttl_set:
            return  # not running here (finished, or never was): nothing more to tell
        if len(self._followers) >= FOLLOWED_MAX:
            self._followers.clear()  # forgotten followers read at their next poll
        self._followers.setdefault(self._stream_key(notice.user, notice.id), set()).add(notice.follower)

    async def create(self, meta: StreamMeta) -> bool:
        """One round trip: the claim, and the user's index (ZADD NX: a lost claim's id is
        already there, and keeps its place)."""
        user_key = self._user_key(meta.user)
        pipe = self.ctx.client.pipeline(transaction=False)
        pipe.set(self._meta_key(meta.user, meta.id), json.dumps(asdict(meta)), nx=True, ex=self.ttl_s)
        pipe.zadd(user_key, {meta.id: meta.created_at}, nx=True)
        # Keep the index bounded for a user who never reconnects (hello prunes expired ids).
        pipe.zremrangebyrank(user_key, 0, -(USER_INDEX_MAX + 1))
        pipe.expire(user_key, self.user_ttl_s)
        results = await pipe.execute()
        if not results[0]:
            return False
        self._remember(meta, time.monotonic(), stream_ttl=False)
        return True

    def _remember(self, meta: StreamMeta, ttl_set_at: float, *, stream_ttl: bool) -> None:
        if len(self._ttl_set) >= TTL_TRACKED_MAX:
            self._ttl_set.clear()  # forgotten streams just get all their TTLs set again
        self._ttl_set[(meta.user, meta.id)] = (ttl_set_at, stream_ttl)

    async def get(self, user: str, stream_id: str) -> StreamMeta | None:
        raw = await self.ctx.client.get(self._meta_key(user, stream_id))
        if raw is None:
            return None
        return StreamMeta(**json.loads(raw))

    async def _execute(self, writes: list[_Write]) -> None:
        """One commit: every write's XADD, and the EXPIREs due. The metadata and the index
        got theirs at create; a stream's first XADD creates its key, which gets one then;
        all three are set again with the terminal and once a tenth of the TTL has passed.
        One round trip."""
        pipe = self.ctx.client.pipeline(transaction=False)
        now = time.monotonic()
        refresh_after = self.ttl_s * TTL_REFRESH_FRACTION
        before: dict[tuple[str, str], tuple[float, bool] | None] = {}
        for write in writes:
            meta = write.meta
            ident = (meta.user, meta.id)
            stream_key = self._stream_key(meta.user, meta.id)
            if write.fields is not None:
                pipe.xadd(stream_key, write.fields, maxlen=self.max_entries, approximate=True)
            known = self._ttl_set.get(ident)
            if write.final or known is None or now - known[0] >= refresh_after:
                pipe.expire(stream_key, self.ttl_s)
                pipe.expire(self._meta_key(meta.user, meta.id), self.ttl_s)
                if known is None or now - known[0] >= refresh_after:
                    pipe.expire(self._user_key(meta.user), self.user_ttl_s)
                state: tuple[float, bool] | None = None if write.final else (now, write.fields is not None)
            elif write.fields is not None and not known[1]:
                pipe.expire(stream_key, self.ttl_s)
                state = (known[0], True)
            else:
                continue
            before.setdefault(ident, known)
            if state is None:
                self._ttl_set.pop(ident, None)
            else:
                self._ttl_set[ident] = state
        try:
            await pipe.execute()
        except BaseException:
            # Not known to be set: as it was, so the next write sets them again.
            for ident, known in before.items():
                if known is None:
                    self._ttl_set.pop(ident, None)
                else:
                    self._ttl_set[ident] = known
            raise
        await self._notify([write for write in writes if write.fields is not None])

    async def _notify(self, writes: list[_Write]) -> None:
        """After the commit: the processes following these streams read them now. Best
        effort: a lost notice delays the follower until its next poll."""
        keys = [self._stream_key(write.meta.user, write.meta.id) for write in writes]
        self.tailer.written(keys)
        if not self._followers:
            return
        by_node: dict[str, list[str]] = {}
        for write, key in zip(writes, keys, strict=True):
            nodes = self._followers.pop(key, ()) if write.final else self._followers.get(key, ())
            for node in nodes:
                by_node.setdefault(node, []).append(key)
        if not by_node:
            return
        pipe = self.ctx.client.pipeline(transaction=False)
        for node, node_keys in by_node.items():
            pipe.spublish(self.ctx.channel("node", node), written_payload(node_keys))
        try:
            await pipe.execute()
            self.notices += len(by_node)
        except (RedisError, RedisClusterException, OSError):
            logger.debug("could not send a written notice")

    async def touch(self, meta: StreamMeta) -> None:
        known = self._ttl_set.get((meta.user, meta.id))
        self._remember(meta, -float("inf"), stream_ttl=known[1] if known else False)
        await self.commit.submit(_Write(meta, None, False))

    async def write(self, meta: StreamMeta, batch: TokenBatch) -> None:
        # A room's members read each batch live, as soon as it is stored: no waiting.
        fields = {"f": str(batch.first_seq), "t": json.dumps(batch.texts)}
        if batch.kinds is not None:
            fields["k"] = json.dumps([kind_to_wire(kind) for kind in batch.kinds], separators=(",", ":"))
        await self.commit.submit(_Write(meta, fields, False), urgent=meta.room is not None)

    async def finish(self, meta: StreamMeta, terminal: Terminal) -> None:
        await self.commit.submit(_Write(meta, {"e": json.dumps(terminal_to_dict(terminal))}, True), urgent=True)

    async def follow(self, meta: StreamMeta, after: int) -> AsyncIterator[StreamEvent]:
        """What is stored, read with plain reads from the command pool; then the live tail
        from the process's tailing read."""
        stream_key = self._stream_key(meta.user, meta.id)
        reader = _EntryReader(after)
        last_id = "0-0"
        backoff = 0.1
        while True:
            try:
                response: Any = await self.ctx.client.xread({stream_key: last_id}, count=TAIL_COUNT)
            except (RedisError, OSError) as exc:
                self.ctx.report_error(exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            entries: list[Entry] = response[0][1] if response else []
            if entries:
                last_id = entries[-1][0]
                for event in reader.read(entries):
                    yield event
                if reader.ended:
                    return
            if len(entries) < TAIL_COUNT:
                break
        subscription = self.tailer.subscribe(stream_key, last_id)
        try:
            producer_missing_since: float | None = None
            while True:
                entries = await subscription.take(FOLLOW_IDLE_CHECK_S)
                self.tailer.taken(subscription)
                if entries:
                    producer_missing_since = None
                    for event in reader.read(entries):
                        yield event
                    if reader.ended:
                        return
                    continue
                try:
                    alive = await self.ctx.node_alive(meta.node)
                    meta_exists = bool(await self.ctx.client.exists(self._meta_key(meta.user, meta.id)))
                except (RedisError, OSError) as exc:
                    self.ctx.report_error(exc)
                    continue
                if not meta_exists:
                    # Expired without a terminal frame (its producer could not store one).
                    yield Failed(ErrorCode.BACKEND_ERROR, "this generation's stored stream expired")
                    return
                if alive:
                    producer_missing_since = None
                elif producer_missing_since is None:
                    producer_missing_since = anyio.current_time()
                elif anyio.current_time() - producer_missing_since > self.ctx.node_ttl_s:
                    # The producer's liveness key stayed gone (not just a Redis restart that
                    # it has yet to notice) and no terminal was written.
                    yield Failed(ErrorCode.BACKEND_ERROR, "the server producing this generation went away")
                    return
        finally:
            self.tailer.unsubscribe(subscription)

    async def resumable(self, user: str) -> list[StreamMeta]:
        ids: list[str] = list(await self.ctx.client.zrange(self._user_key(user), 0, -1))
        if not ids:
            return []
        raws = await self.ctx.client.mget([self._meta_key(user, stream_id) for stream_id in ids])
        metas = []
        expired = []
        for stream_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                expired.append(stream_id)
            else:
                metas.append(StreamMeta(**json.loads(raw)))
        if expired:
            await self.ctx.client.zrem(self._user_key(user), *expired)
        return metas


class _EntryReader:
    """Turns a stream's entries into events: each token after ``after`` exactly once (a
    batch written twice, by a retried commit, is skipped), then the terminal."""

    __slots__ = ("ended", "position")

    def __init__(self, after: int) -> None:
        self.position = max(after + 1, 0)
        self.ended = False

    def read(self, entries: list[Entry]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for _entry_id, fields in entries:
            if "e" in fields:
                events.append(terminal_from_dict(json.loads(fields["e"])))
                self.ended = True
                return events
            first = int(fields["f"])
            texts = json.loads(fields["t"])
            end = first + len(texts)
            if end <= self.position:
                continue
            if first > self.position:
                # Entries are missing (Redis lost data): never paper over a gap.
                events.append(Failed(ErrorCode.BACKEND_ERROR, "stored tokens were lost; the answer is incomplete"))
                self.ended = True
                return events
            skip = self.position - first
            kinds = fields.get("k")
            events.append(TokenBatch(first + skip, tuple(texts[skip:]),
                                     tuple(map(kind_from_wire, json.loads(kinds)[skip:])) if kinds else None))
            self.position = end
        return events
