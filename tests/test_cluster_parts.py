"""One conformance suite for every implementation of the cluster parts: the stream
store, the limit store and the backplane, memory:// and redis://, built by URL scheme; the
Redis parts on a single Redis and on a Redis Cluster of three primaries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
import pytest

from config import Settings
from gateway.cluster import build_cluster
from gateway.cluster.base import Cluster, LimitStore, StreamEvent, StreamMeta, StreamStore, TokenBatch
from gateway.cluster.control import (
    Broadcast,
    Cancel,
    ControlMessage,
    FollowNotice,
    Presence,
    RoomEnd,
    RoomEvents,
    RoomStart,
    RoomTokens,
    audience,
)
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import GatewayError, RateLimited
from gateway.wire.events import REASONING, TEXT, DeltaKind, Done, Failed, ToolCallDelta, Usage
from tests.redis_support import TEST_REDIS_URL, require_redis, unique_prefix
from tests.support import make_settings

pytestmark = pytest.mark.anyio


def settings_for(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"redis_prefix": unique_prefix(), "resume_ttl_s": 5, "node_ttl_s": 1}
    values.update(overrides)
    return make_settings(**values)


# Every kind: memory, single Redis, and Redis Cluster. The Cluster's cases run with the slow
# set (CI runs them all), so that ``pytest -m "not slow"`` stays within its minute.
CLUSTER_KIND = pytest.param("redis-cluster", marks=pytest.mark.slow)
KINDS = ["memory", "redis", CLUSTER_KIND]
REDIS_KINDS = ["redis", CLUSTER_KIND]


async def make_parts(kind: str, settings: Settings, request: pytest.FixtureRequest | None = None,
                     ) -> tuple[StreamStore, LimitStore, Any]:
    """The parts of a started cluster of ``kind``; the third item is the cluster, to close."""
    cluster = await start_cluster(kind, settings, request)
    return cluster.store, cluster.limits, cluster


class Started:
    """A started cluster with the background loops it asked for, owned here: ``aclose``
    stops them, then closes the cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.loops: dict[str, asyncio.Task[None]] = {}

    def spawn(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            await loop()

        self.loops[name] = asyncio.get_running_loop().create_task(run(), name=name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster, name)

    async def aclose(self) -> None:
        # Cancelled again until they stop: a plain asyncio cancel is delivered once, and one
        # that lands as a Redis call times out can be lost in that timeout (the gateway's
        # own task groups cancel at every await, so they never lose one). Bounded: a loop
        # that still runs after 10 s fails the test, by name.
        pending = set(self.loops.values())
        deadline = asyncio.get_running_loop().time() + 10
        while pending and asyncio.get_running_loop().time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        assert not pending, f"loops that did not stop: {[task.get_name() for task in pending]}"
        await self.cluster.aclose()


async def start_cluster(kind: str, settings: Settings, request: pytest.FixtureRequest | None = None) -> Any:
    """A started cluster of ``kind``; ``redis-cluster`` needs the test's ``request`` (for the
    session's Redis Cluster)."""
    update: dict[str, Any] = {"cluster_url": "memory://"}
    if kind == "redis":
        require_redis()
        update["cluster_url"] = TEST_REDIS_URL
    elif kind == "redis-cluster":
        assert request is not None, "a Redis Cluster test passes its request"
        update.update(cluster_url=request.getfixturevalue("redis_cluster_url"), redis_cluster=True)
    started = Started(build_cluster(settings.model_copy(update=update)))
    await started.cluster.start(started.spawn)
    return started


@pytest.fixture(params=KINDS)
async def parts(request: pytest.FixtureRequest) -> AsyncIterator[tuple[StreamStore, LimitStore, Any]]:
    store, limits, context = await make_parts(request.param, settings_for(
        max_streams_per_user=2, max_connections_per_user=2, user_generate_rate_per_s=1, user_generate_burst=3),
        request)
    try:
        yield store, limits, context
    finally:
        if context is not None:
            await context.aclose()


def meta_for(store_parts: Any, user: str = "u1", stream_id: str = "s1") -> StreamMeta:
    node = store_parts[2].node_id
    return StreamMeta(user=user, id=stream_id, epoch="e-1", node=node, created_at=time.time())


async def collect(events: AsyncIterator[StreamEvent], timeout: float = 5) -> list[StreamEvent]:
    out = []
    with anyio.fail_after(timeout):
        async for event in events:
            out.append(event)
    return out


def texts_of(events: list[StreamEvent]) -> tuple[int, str]:
    batches = [e for e in events if isinstance(e, TokenBatch)]
    first = batches[0].first_seq if batches else -1
    return first, "".join("".join(b.texts) for b in batches)


async def test_create_is_a_claim(parts: Any) -> None:
    store = parts[0]
    meta = meta_for(parts)
    assert await store.create(meta) is True
    assert await store.create(meta) is False
    assert await store.get("u1", "s1") == meta
    assert await store.get("u2", "s1") is None  # ids are scoped to their user
    assert await store.create(meta_for(parts, user="u2")) is True


async def test_user_and_id_can_never_collide(parts: Any) -> None:
    store = parts[0]
    assert await store.create(meta_for(parts, user="alice:x", stream_id="y")) is True
    mine = meta_for(parts, user="alice", stream_id="x:y")
    assert await store.create(mine) is True
    assert await store.get("alice", "x:y") == mine
    assert [m.user for m in await store.resumable("alice")] == ["alice"]


async def test_follow_replays_after_seq_then_the_live_tail_then_the_terminal(parts: Any) -> None:
    store = parts[0]
    meta = meta_for(parts)
    await store.create(meta)
    await store.write(meta, TokenBatch(0, ("a", "b", "c")))
    await store.write(meta, TokenBatch(3, ("d",)))
    received: list[StreamEvent] = []

    async def follower() -> None:
        with anyio.fail_after(10):
            async for event in store.follow(meta, 1):
                received.append(event)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follower)
        with anyio.fail_after(5):
            while texts_of(received)[1] != "cd":
                await anyio.sleep(0.01)
        await store.write(meta, TokenBatch(4, ("e", "f")))
        await store.finish(meta, Done("stop", Usage(1, 6)))
    assert texts_of(received) == (2, "cdef")
    assert received[-1] == Done("stop", Usage(1, 6))
    # A finished stream replays to its end, from anywhere.
    assert texts_of(await collect(store.follow(meta, -1))) == (0, "abcdef")
    assert texts_of(await collect(store.follow(meta, 4))) == (5, "f")
    assert await collect(store.follow(meta, 100)) == [Done("stop", Usage(1, 6))]


def deltas_of(events: list[StreamEvent]) -> list[tuple[int, str, DeltaKind]]:
    """Each delta with its seq and kind, as the batches carry them."""
    out = []
    for batch in (e for e in events if isinstance(e, TokenBatch)):
        kinds = batch.kinds if batch.kinds is not None else (TEXT,) * len(batch.texts)
        assert len(kinds) == len(batch.texts)
        out += [(batch.first_seq + i, text, kind)
                for i, (text, kind) in enumerate(zip(batch.texts, kinds, strict=True))]
    return out


CALL = ToolCallDelta(0, "call_abc", "get_weather")
MORE = ToolCallDelta(0)
SECOND = ToolCallDelta(1, "call_def", None)


async def test_the_store_keeps_the_kind_of_every_delta(parts: Any) -> None:
    store = parts[0]
    meta = meta_for(parts)
    await store.create(meta)
    # Text only first (no kinds: the common case), then every kind, then text again.
    await store.write(meta, TokenBatch(0, ("Let", " me")))
    await store.write(meta, TokenBatch(2, ("think", "", '{"ci', "ty", "{}", "Done"),
                                       (REASONING, CALL, MORE, MORE, SECOND, TEXT)))
    await store.write(meta, TokenBatch(8, ("!",)))
    await store.finish(meta, Done("tool_calls", Usage(3, 9, 1, 64)))
    expected = [(0, "Let", TEXT), (1, " me", TEXT), (2, "think", REASONING), (3, "", CALL), (4, '{"ci', MORE),
                (5, "ty", MORE), (6, "{}", SECOND), (7, "Done", TEXT), (8, "!", TEXT)]
    events = await collect(store.follow(meta, -1))
    assert deltas_of(events) == expected
    assert events[-1] == Done("tool_calls", Usage(3, 9, 1, 64))
    # A resume after any seq, of any kind, gets the rest with its kinds, once each.
    for after in range(-1, 9):
        assert deltas_of(await collect(store.follow(meta, after))) == expected[after + 1:]


async def test_resumable_lists_the_users_streams(parts: Any) -> None:
    store = parts[0]
    for stream_id in ("x1", "x2"):
        await store.create(meta_for(parts, stream_id=stream_id))
    await store.create(meta_for(parts, user="someone-else", stream_id="x3"))
    assert [m.id for m in await store.resumable("u1")] == ["x1", "x2"]


@pytest.mark.slow
async def test_streams_expire_after_the_ttl_from_the_last_write(request: pytest.FixtureRequest) -> None:
    for kind in ("memory", "redis", "redis-cluster"):
        store, _, context = await make_parts(kind, settings_for(resume_ttl_s=1), request)
        try:
            meta = meta_for((store, None, context))
            await store.create(meta)
            await store.finish(meta, Done("stop"))
            assert await store.get("u1", "s1") is not None
            await anyio.sleep(1.3)  # the TTL is the behaviour under test
            assert await store.get("u1", "s1") is None, kind
            assert await store.create(meta) is True, kind
        finally:
            if context is not None:
                await context.aclose()


async def test_connection_limit(parts: Any) -> None:
    limits = parts[1]
    first = await limits.add_connection("u1")
    second = await limits.add_connection("u1")
    assert first is not None and second is not None
    assert await limits.add_connection("u1") is None
    assert await limits.add_connection("u2") is not None
    await first.release()
    await first.release()  # releasing twice is harmless
    assert await limits.add_connection("u1") is not None
    assert await limits.add_connection("u1") is None


async def test_generation_concurrency_and_rate(parts: Any) -> None:
    limits = parts[1]
    a = await limits.acquire_generation("u1")
    await limits.acquire_generation("u1")
    with pytest.raises(GatewayError) as info:
        await limits.acquire_generation("u1")
    assert info.value.code is ErrorCode.TOO_MANY_STREAMS
    await a.release()
    await limits.acquire_generation("u1")  # the third of a burst of 3
    for _ in range(3):
        await (await limits.acquire_generation("u2")).release()
    with pytest.raises(RateLimited) as rate:
        await limits.acquire_generation("u2")
    assert 0 < float(str(rate.value.extra["retry_after_s"])) <= 1.0


@pytest.mark.parametrize("kind", REDIS_KINDS)
async def test_redis_slots_of_a_dead_process_come_back(kind: str, request: pytest.FixtureRequest) -> None:
    settings = settings_for(max_connections_per_user=1, node_ttl_s=0.3)
    _, limits_a, context_a = await make_parts(kind, settings, request)
    _, limits_b, context_b = await make_parts(kind, settings, request)
    try:
        assert await limits_a.add_connection("u1") is not None
        assert await limits_b.add_connection("u1") is None  # held by process A
        # While A lives, it keeps its count alive past the node TTL.
        await anyio.sleep(0.6)
        assert await limits_b.add_connection("u1") is None
        # Process A dies: nobody keeps its count alive, and nobody releases its slot.
        await context_a.aclose()
        with anyio.fail_after(5):
            while await limits_b.add_connection("u1") is None:
                await anyio.sleep(0.05)
    finally:
        await context_a.aclose()
        await context_b.aclose()


async def test_a_user_name_cannot_break_out_of_its_hash_tag() -> None:
    from gateway.cluster.redis.context import RedisContext, slot_of

    context = RedisContext(settings_for(), "redis://127.0.0.1:1/0")
    try:
        for user in ("alice", "a}b", "{x}", "}{", "", "a:b", "{"):
            keys = [context.user_key(user, "m", "r1"), context.user_key(user, "s", "r1"),
                    context.user_key(user, "u"), context.user_key(user, "c", "gen"), context.user_key(user, "rate")]
            # Every key of a user is in one slot, the slot of the escaped user alone.
            assert {slot_of(key) for key in keys} == {slot_of("{" + (keys[0].split("{", 1)[1].split("}", 1)[0]) + "}")}
            assert keys[0].count("{") == 1 and keys[0].count("}") == 1
        assert context.user_key("alice", "m", "r1").endswith("{alice}:m:r1")
        assert context.user_key("a}b", "u") != context.user_key("a", "b}:u")
    finally:
        await context.client.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("kind", REDIS_KINDS)
async def test_follow_ends_with_backend_error_when_the_producer_died(kind: str, request: pytest.FixtureRequest) -> None:
    settings = settings_for(node_ttl_s=0.5)
    store, _, context = await make_parts(kind, settings, request)
    try:
        meta = StreamMeta(user="u1", id="orphan", epoch="e", node="n-gone", created_at=time.time())
        await store.create(meta)
        await store.write(meta, TokenBatch(0, ("a",)))
        events = await collect(store.follow(meta, -1), timeout=10)
        assert texts_of(events) == (0, "a")
        assert isinstance(events[-1], Failed) and events[-1].code == "backend_error"
    finally:
        await context.aclose()


MESSAGES: list[ControlMessage] = [
    Cancel("u1", "s1", "NODE"),
    FollowNotice("u1", "s1", "NODE", "n-follower"),
    Broadcast({"text": "hi", "n": [1, 2]}, user=None),
    Broadcast("only you", user="u2"),
    RoomEvents("lobby", (Presence("u1", "join"),), origin="c-1"),
    RoomEvents("lobby", (RoomStart("r1", "e-1"), RoomTokens("r1", 3, "abc"),
                         RoomTokens("r1", 5, "hm", REASONING), RoomTokens("r1", 6, "", ToolCallDelta(0, "c", "f")),
                         RoomTokens("r1", 8, '{"a":1}', ToolCallDelta(0)),
                         RoomEnd("r1", Done("tool_calls", Usage(2, 9, 2, 0))),
                         RoomEnd("r3", Done("stop", Usage(2, 4))),
                         RoomEnd("r2", Failed("backend_error", "it broke", {"upstream_status": 502})))),
]


def addressed_to(node: str, messages: list[ControlMessage]) -> list[ControlMessage]:
    return [replace(m, node=node) if isinstance(m, Cancel | FollowNotice) else m for m in messages]


async def heard(cluster: Any, received: list[ControlMessage], messages: list[ControlMessage]) -> None:
    """Publishes each of ``messages`` until it has come back: a subscription is in place
    once a message published after it arrives."""
    with anyio.fail_after(5):
        while not all(message in received for message in messages):
            for message in messages:
                if message not in received:
                    await cluster.backplane.publish(message)
            await anyio.sleep(0.05)


def by_audience(messages: list[ControlMessage]) -> dict[tuple[str, str], list[ControlMessage]]:
    """The messages of each audience, in order: the order a backplane keeps."""
    grouped: dict[tuple[str, str], list[ControlMessage]] = {}
    for message in messages:
        grouped.setdefault(audience(message), []).append(message)
    return grouped


@pytest.mark.parametrize("kind", KINDS)
async def test_backplane_delivers_every_message_typed_and_in_order(kind: str, request: pytest.FixtureRequest) -> None:
    cluster = await start_cluster(kind, settings_for(), request)
    received: list[ControlMessage] = []
    cluster.backplane.set_handler(received.append)
    probes: list[ControlMessage] = [Cancel("probe", "probe", cluster.node_id), Broadcast("probe"),
                                    RoomEvents("lobby", (Presence("probe", "join"),))]
    messages = addressed_to(cluster.node_id, MESSAGES)
    try:
        await cluster.backplane.subscribe_room("lobby")
        await heard(cluster, received, probes)
        received.clear()
        for message in messages:
            await cluster.backplane.publish(message)
        with anyio.fail_after(5):
            while len([m for m in received if m not in probes]) < len(messages):
                await anyio.sleep(0.01)
    finally:
        await cluster.aclose()
    assert by_audience([m for m in received if m not in probes]) == by_audience(messages)


@pytest.mark.parametrize("kind", KINDS)
async def test_backplane_delivers_a_message_to_its_audience_only(kind: str, request: pytest.FixtureRequest) -> None:
    """Another node's messages and the rooms it has not subscribed to never reach a
    process; a room's messages do from its subscription until its unsubscription. What did
    not arrive by the time a later message to each subscription did never will: a node
    delivers a subscriber's messages in the order published."""
    cluster = await start_cluster(kind, settings_for(), request)
    received: list[ControlMessage] = []
    cluster.backplane.set_handler(received.append)
    mine: ControlMessage = Cancel("u1", "mine", cluster.node_id)
    everyone: ControlMessage = Broadcast("barrier")
    room_barrier: ControlMessage = RoomEvents("in", (Presence("barrier", "join"),))
    joined = RoomEvents("in", (Presence("u1", "join"),))
    try:
        await cluster.backplane.subscribe_room("in")
        await heard(cluster, received, [mine, everyone, room_barrier])
        received.clear()
        await cluster.backplane.publish(Cancel("u1", "other", "n-someone-else"))
        await cluster.backplane.publish(RoomEvents("out", (Presence("u1", "join"),)))
        await cluster.backplane.publish(joined)
        await heard(cluster, received, [mine, everyone, room_barrier])
        assert [m for m in received if m not in (mine, everyone, room_barrier)] == [joined]
        received.clear()
        await cluster.backplane.unsubscribe_room("in")
        await cluster.backplane.publish(RoomEvents("in", (Presence("u1", "leave"),)))
        await heard(cluster, received, [mine, everyone])
        assert [m for m in received if m not in (mine, everyone)] == []
    finally:
        await cluster.aclose()


async def test_the_memory_store_keeps_to_its_budget_evicting_the_oldest_finished_first() -> None:
    from gateway.cluster.memory import MemoryStreamStore

    store = MemoryStreamStore(settings_for(store_max_bytes=64 * 1024))
    text = "x" * 200  # 264 bytes a token stored, twice that while running
    for index in range(20):
        meta = StreamMeta(user="u1", id=f"s{index}", epoch="e", node="local", created_at=time.time() + index)
        assert await store.create(meta)
        await store.write(meta, TokenBatch(0, (text,) * 20))
        await store.finish(meta, Done("stop"))
        assert store.used_bytes <= store.max_bytes
    assert store.evicted > 0
    assert await store.get("u1", "s0") is None  # the oldest went first
    assert await store.get("u1", "s19") is not None
    kept = [m.id for m in await store.resumable("u1")]
    assert kept == [f"s{i}" for i in range(20 - len(kept), 20)]


async def test_a_finished_stream_is_packed_and_counts_what_it_keeps() -> None:
    # Kept for the TTL as one string and the end of each token, not thousands of small
    # strings; every token reads back exactly, whatever its characters, from any position.
    import sys

    from gateway.cluster.memory import PACKED_TOKEN_BYTES, RECORD_BYTES, MemoryStreamStore

    store = MemoryStreamStore(settings_for())
    tokens = tuple(["Hé", "llo", " 🙂", "", "wörld", "!"] * 300)
    kinds: tuple[DeltaKind, ...] = tuple([TEXT, REASONING] * 900)
    meta = StreamMeta(user="u1", id="p", epoch="e", node="local", created_at=time.time())
    assert await store.create(meta)
    await store.write(meta, TokenBatch(0, tokens[:1000], kinds[:1000]))
    await store.write(meta, TokenBatch(1000, tokens[1000:], kinds[1000:]))
    running = store.used_bytes
    await store.finish(meta, Done("stop"))
    kinds_cost = 8 * len(kinds)
    assert store.used_bytes == RECORD_BYTES + sys.getsizeof("".join(tokens)) + PACKED_TOKEN_BYTES * len(tokens) \
        + kinds_cost < running
    for after in (-1, 0, 2, 1234, len(tokens) - 2, len(tokens) - 1):
        events = await collect(store.follow(meta, after))
        batches = [e for e in events if isinstance(e, TokenBatch)]
        assert tuple(t for b in batches for t in b.texts) == tokens[after + 1:]
        assert tuple(k for b in batches for k in (b.kinds or ())) == kinds[after + 1:]
        assert events[-1] == Done("stop")


async def test_when_running_streams_fill_the_memory_budget_new_ones_are_refused() -> None:
    from gateway.cluster.memory import MemoryStreamStore

    store = MemoryStreamStore(settings_for(store_max_bytes=64 * 1024))
    running = 0
    with pytest.raises(GatewayError) as full:
        for index in range(100):
            meta = StreamMeta(user="u1", id=f"r{index}", epoch="e", node="local", created_at=time.time())
            await store.create(meta)
            await store.write(meta, TokenBatch(0, ("y" * 500,) * 10))
            running += 1
    assert full.value.code == ErrorCode.TOO_MANY_STREAMS
    assert 0 < running < 100 and store.evicted == 0  # nothing finished: nothing to evict


async def test_the_rate_buckets_of_users_who_went_quiet_are_dropped() -> None:
    from gateway.cluster.memory import MemoryLimitStore

    limits = MemoryLimitStore(settings_for(user_generate_rate_per_s=10000, user_generate_burst=1))
    for index in range(100):  # users who generate once and leave (no connection of theirs stays)
        await (await limits.acquire_generation(f"gone-{index}")).release()
    with anyio.fail_after(5):
        while not all(bucket.full(anyio.current_time()) for bucket in limits.buckets.values()):
            await anyio.sleep(0.001)
    for _ in range(60):  # someone keeps generating: each generate sweeps two of the oldest
        await (await limits.acquire_generation("active")).release()
        await anyio.sleep(0.0002)
    assert not [user for user in limits.buckets if user.startswith("gone-")]


# The Redis store's own guarantees: one commit per interval for every stream, and one
# tailing read for every follower, outside the command pool.

@pytest.mark.parametrize("kind", REDIS_KINDS)
async def test_redis_writes_of_many_streams_share_commits_and_set_each_ttl_once(
        kind: str, request: pytest.FixtureRequest) -> None:
    cluster = await start_cluster(kind, settings_for(resume_ttl_s=60), request)
    store = cluster.store
    metas = [meta_for((None, None, cluster), stream_id=f"s{index}") for index in range(200)]
    try:
        for meta in metas:
            await store.create(meta)
        commits_before = store.commit.commits
        async with anyio.create_task_group() as tg:
            for meta in metas:
                tg.start_soon(store.write, meta, TokenBatch(0, ("a", "b")))
        # The first writer's commit goes at once; the other 199 share the next one.
        assert store.commit.commits - commits_before <= 2
        client = cluster.context.client
        stream_key = store._stream_key("u1", "s7")
        assert 0 < await client.ttl(stream_key) <= 60
        await client.persist(stream_key)
        await store.write(metas[7], TokenBatch(2, ("c",)))
        # Within a tenth of the TTL of the last setting, a write sets no TTL again ...
        assert await client.ttl(stream_key) == -1
        await store.finish(metas[7], Done("stop", Usage(1, 3)))
        # ... and the terminal always does.
        assert 0 < await client.ttl(stream_key) <= 60
        assert texts_of(await collect(store.follow(metas[7], -1))) == (0, "abc")
    finally:
        await cluster.aclose()


@pytest.mark.parametrize("kind", REDIS_KINDS)
async def test_redis_followers_tail_through_one_read_and_never_take_the_command_pool(
        kind: str, request: pytest.FixtureRequest) -> None:
    # A pool of two connections: followers that each blocked in a read of their own would
    # starve the writes, and the writer below would never get through.
    cluster = await start_cluster(kind, settings_for(redis_max_connections=2, redis_pool_timeout_s=2,
                                                     resume_ttl_s=60), request)
    store = cluster.store
    count = 300
    metas = [meta_for((None, None, cluster), stream_id=f"f{index}") for index in range(count)]
    received: dict[str, list[StreamEvent]] = {meta.id: [] for meta in metas}
    try:
        async def start(meta: StreamMeta) -> None:
            await store.create(meta)
            await store.write(meta, TokenBatch(0, ("x",)))

        async with anyio.create_task_group() as tg:
            for meta in metas:
                tg.start_soon(start, meta)

        async def follower(meta: StreamMeta) -> None:
            async for event in store.follow(meta, -1):
                received[meta.id].append(event)

        async def write_the_rest(meta: StreamMeta) -> None:
            await store.write(meta, TokenBatch(1, ("y", "z")))
            await store.finish(meta, Done("stop", Usage(1, 3)))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for meta in metas:
                    tg.start_soon(follower, meta)
                while store.tailer.followed < count:
                    await anyio.sleep(0.01)
                for meta in metas:
                    tg.start_soon(write_the_rest, meta)
        wrong = {k: (texts_of(v), v[-1:]) for k, v in received.items() if texts_of(v) != (0, "xyz")}
        assert not wrong
        assert all(events[-1] == Done("stop", Usage(1, 3)) for events in received.values())
        # Far fewer reads than followers times entries: each read served many followers.
        assert store.tailer.reads < count
        assert store.tailer.followed == 0
        assert cluster.health.up
    finally:
        await cluster.aclose()


@pytest.mark.parametrize("kind", REDIS_KINDS)
async def test_a_follower_elsewhere_is_told_of_new_entries_instead_of_waiting_for_its_poll(
        kind: str, request: pytest.FixtureRequest) -> None:
    """Process B follows a stream of process A: once A knows B (its follow notice), each
    commit of A that writes the stream sends B a notice, and B reads at once, well within
    its fallback poll."""
    from gateway.cluster.redis.tailer import TAIL_POLL_S

    settings = settings_for(resume_ttl_s=60)
    a = await start_cluster(kind, settings, request)
    b = await start_cluster(kind, settings, request)
    try:
        meta = meta_for((None, None, a))
        await a.store.create(meta)
        await a.store.write(meta, TokenBatch(0, ("a",)))
        received: list[StreamEvent] = []

        async def follow() -> None:
            async for event in b.store.follow(meta, -1):
                received.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            with anyio.fail_after(5):
                while texts_of(received)[1] != "a":
                    await anyio.sleep(0.01)
                # B's follow notice reaches A (as a resume on B sends it).
                notice = FollowNotice(meta.user, meta.id, a.node_id, b.node_id)
                while not a.store._followers:
                    await b.backplane.publish(notice)
                    await anyio.sleep(0.02)
            for index, text in enumerate("bcd", start=1):
                await a.store.write(meta, TokenBatch(index, (text,)))
                with anyio.fail_after(TAIL_POLL_S / 2):
                    while texts_of(received)[1] != "abcd"[:index + 1]:
                        await anyio.sleep(0.005)
            await a.store.finish(meta, Done("stop", Usage(1, 4)))
            with anyio.fail_after(TAIL_POLL_S / 2):
                while not received or received[-1] != Done("stop", Usage(1, 4)):
                    await anyio.sleep(0.005)
        assert a.store.notices >= 4
        assert not a.store._followers  # forgotten with the terminal
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_redis_pool_with_no_free_connection_is_not_redis_down() -> None:
    cluster = await start_cluster("redis", settings_for(redis_max_connections=2, redis_pool_timeout_s=0.2))
    context = cluster.context
    pool = context.client.connection_pool
    held = [await pool.get_connection(), await pool.get_connection()]
    try:
        with pytest.raises(Exception) as raised:
            await cluster.store.get("u1", "nothing")
        context.report_error(raised.value)
        assert cluster.health.up
        # A real failure still is.
        context.report_error(ConnectionError("connection refused"))
        assert not cluster.health.up
    finally:
        for connection in held:
            await pool.release(connection)
        await cluster.aclose()


async def test_the_memory_store_gives_back_expired_streams_while_nothing_is_written() -> None:
    started = await start_cluster("memory", settings_for(resume_ttl_s=1))
    store = started.store
    try:
        meta = meta_for((None, None, started))
        await store.create(meta)
        await store.write(meta, TokenBatch(0, ("a" * 1000,)))
        await store.finish(meta, Done("stop", Usage(1, 1)))
        assert store.used_bytes > 1000
        # No create, write or hello after this: only the store's own expiry loop runs.
        with anyio.fail_after(5):
            while store.used_bytes > 0:
                await anyio.sleep(0.1)
        assert await store.get("u1", "s1") is None
    finally:
        await started.aclose()


async def test_a_room_subscription_that_fails_is_made_again_by_the_next_session(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the node refuses one room subscription. The join still returns (the
    backplane is down for that moment), the supervised listener starts a new session, and
    the room's messages arrive."""
    import functools

    import redis.asyncio.client
    from redis.exceptions import ConnectionError as RedisConnectionError

    from gateway.supervise import supervise

    require_redis()
    original = redis.asyncio.client.PubSub.ssubscribe
    refused: list[str] = []

    async def refuse_once(self: Any, *channels: Any, **kwargs: Any) -> Any:
        if not refused and any("room" in str(channel) for channel in channels):
            refused.append(str(channels[0]))
            raise RedisConnectionError("injected")
        return await original(self, *channels, **kwargs)

    monkeypatch.setattr(redis.asyncio.client.PubSub, "ssubscribe", refuse_once)
    settings = settings_for().model_copy(update={"cluster_url": TEST_REDIS_URL})
    started = Started(build_cluster(settings))
    await started.cluster.start(lambda name, loop: started.spawn(name, functools.partial(supervise, name, loop)))
    received: list[ControlMessage] = []
    started.backplane.set_handler(received.append)
    message = RoomEvents("retried", (Presence("u1", "join"),))
    try:
        with anyio.fail_after(5):
            while started.backplane._session is None:
                await anyio.sleep(0.01)
            await started.backplane.subscribe_room("retried")
            assert refused
            while message not in received:
                await started.backplane.publish(message)
                await anyio.sleep(0.05)
    finally:
        await started.aclose()


async def test_redis_counts_keep_no_field_of_a_process_whose_time_passed() -> None:
    cluster = await start_cluster("redis", settings_for(max_connections_per_user=5))
    context = cluster.context
    key = context.user_key("u1", "c", "conn")
    try:
        # A process that died with a count, and one whose time was left without its count.
        await context.client.hset(key, mapping={"n-dead": 2, "n-dead:exp": 1, "n-gone:exp": 1})
        lease = await cluster.limits.add_connection("u1")
        assert lease is not None
        fields = await context.client.hgetall(key)
        assert set(fields) == {context.node_id, context.node_id + ":exp"}
        assert fields[context.node_id] == "1"
    finally:
        await cluster.aclose()


async def test_a_redis_without_sharded_pub_sub_is_refused_at_start_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a server that does not know SPUBLISH (Redis before 7)."""
    import redis.asyncio
    from redis.exceptions import ResponseError

    from gateway.cluster.redis.context import RedisUnavailable

    require_redis()

    async def unknown(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise ResponseError("unknown command 'SPUBLISH'")

    monkeypatch.setattr(redis.asyncio.Redis, "spublish", unknown)
    cluster = build_cluster(settings_for().model_copy(update={"cluster_url": TEST_REDIS_URL}))
    try:
        with pytest.raises(RedisUnavailable, match="needs Redis 7 or newer"):
            await cluster.start(lambda name, loop: None)
    finally:
        await cluster.aclose()
