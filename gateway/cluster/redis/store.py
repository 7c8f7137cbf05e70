"""Stream store in Redis: one Redis Stream per generation, capped, with a TTL.

Keys (prefix ``GATEWAY_REDIS_PREFIX`` then ``v2:``):
- ``m:<user>:<id>``: the stream's metadata (JSON), created with SET NX: the id claim;
- ``s:<user>:<id>``: the Redis Stream; one entry per batch of tokens (``f`` first seq,
  ``t`` JSON list of texts) and one terminal entry (``e`` the terminal event as JSON);
- ``u:<user>``: a sorted set of the user's stream ids by creation time, for ``hello``.

Every write is one pipelined round trip (XADD plus the EXPIREs that keep the TTL counting
from the last write), and the gateway batches tokens, so Redis sees one entry per batch,
not per token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import anyio
from redis.exceptions import RedisError

from config import Settings
from gateway.cluster.base import StreamEvent, StreamMeta, TokenBatch
from gateway.cluster.control import terminal_from_dict, terminal_to_dict
from gateway.cluster.redis.context import RedisContext
from gateway.wire.codes import ErrorCode
from gateway.wire.events import Failed, Terminal

# How long one blocking read waits before checking that the producer is alive.
FOLLOW_BLOCK_MS = 1000
# The newest ids kept in a user's index (what hello lists as resumable).
USER_INDEX_MAX = 200


class RedisStreamStore:
    name = "redis"
    # One round trip per generation every 50 ms at most: a paced stream writes one entry per
    # interval, not one per token, and a resume elsewhere runs at most that far behind.
    flush_interval_s = 0.05
    # Redis keeps its own memory (maxmemory and an eviction policy of its own).
    evicted = 0

    def __init__(self, settings: Settings, context: RedisContext) -> None:
        self.ctx = context
        self.ttl_s = max(int(settings.resume_ttl_s), 1)
        # Entries hold at least one token, so max_tokens + 1 entries is the whole stream.
        self.max_entries = settings.max_tokens + 1

    def _meta_key(self, user: str, stream_id: str) -> str:
        return self.ctx.key("m", user, stream_id)

    def _stream_key(self, user: str, stream_id: str) -> str:
        return self.ctx.key("s", user, stream_id)

    def _user_key(self, user: str) -> str:
        return self.ctx.key("u", user)

    async def create(self, meta: StreamMeta) -> bool:
        pipe = self.ctx.client.pipeline(transaction=True)
        pipe.set(self._meta_key(meta.user, meta.id), json.dumps(asdict(meta)), nx=True, ex=self.ttl_s)
        results = await pipe.execute()
        if not results[0]:
            return False
        pipe = self.ctx.client.pipeline(transaction=False)
        pipe.zadd(self._user_key(meta.user), {meta.id: meta.created_at})
        # Keep the index bounded for a user who never reconnects (hello prunes expired ids).
        pipe.zremrangebyrank(self._user_key(meta.user), 0, -(USER_INDEX_MAX + 1))
        pipe.expire(self._user_key(meta.user), self.ttl_s)
        await pipe.execute()
        return True

    async def get(self, user: str, stream_id: str) -> StreamMeta | None:
        raw = await self.ctx.client.get(self._meta_key(user, stream_id))
        if raw is None:
            return None
        return StreamMeta(**json.loads(raw))

    async def _append(self, meta: StreamMeta, fields: dict[str, str] | None) -> None:
        stream_key = self._stream_key(meta.user, meta.id)
        pipe = self.ctx.client.pipeline(transaction=False)
        if fields is not None:
            pipe.xadd(stream_key, fields, maxlen=self.max_entries, approximate=True)  # type: ignore[arg-type]
        pipe.expire(stream_key, self.ttl_s)
        pipe.expire(self._meta_key(meta.user, meta.id), self.ttl_s)
        pipe.expire(self._user_key(meta.user), self.ttl_s)
        await pipe.execute()

    async def touch(self, meta: StreamMeta) -> None:
        await self._append(meta, None)

    async def write(self, meta: StreamMeta, batch: TokenBatch) -> None:
        await self._append(meta, {"f": str(batch.first_seq), "t": json.dumps(batch.texts)})

    async def finish(self, meta: StreamMeta, terminal: Terminal) -> None:
        await self._append(meta, {"e": json.dumps(terminal_to_dict(terminal))})

    async def follow(self, meta: StreamMeta, after: int) -> AsyncIterator[StreamEvent]:
        client = self.ctx.blocking_client
        stream_key = self._stream_key(meta.user, meta.id)
        last_id = "0-0"
        position = max(after + 1, 0)
        backoff = 0.1
        producer_missing_since: float | None = None
        while True:
            try:
                response: Any = await client.xread({stream_key: last_id}, count=512, block=FOLLOW_BLOCK_MS)
                self.ctx.report(True)
                backoff = 0.1
            except (RedisError, OSError):
                # Redis is away: wait for it and carry on from the last entry read.
                self.ctx.report(False)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if not response:
                try:
                    alive = await self.ctx.node_alive(meta.node)
                    meta_exists = bool(await self.ctx.client.exists(self._meta_key(meta.user, meta.id)))
                except (RedisError, OSError):
                    self.ctx.report(False)
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
                continue
            producer_missing_since = None
            for _key, entries in response:
                for entry_id, fields in entries:
                    last_id = entry_id
                    if "e" in fields:
                        yield terminal_from_dict(json.loads(fields["e"]))
                        return
                    first = int(fields["f"])
                    texts = json.loads(fields["t"])
                    end = first + len(texts)
                    if end <= position:
                        continue
                    if first > position:
                        # Entries are missing (Redis lost data): never paper over a gap.
                        yield Failed(ErrorCode.BACKEND_ERROR, "stored tokens were lost; the answer is incomplete")
                        return
                    skip = max(position - first, 0)
                    yield TokenBatch(first + skip, tuple(texts[skip:]))
                    position = end

    async def resumable(self, user: str) -> list[StreamMeta]:
        ids: list[str] = list(await self.ctx.client.zrange(self._user_key(user), 0, -1))  # type: ignore[arg-type]
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
