"""The gateway on a real Redis Cluster of three primaries: room traffic reaches only the
processes with members in the room, a slot moved to another node is followed (MOVED and
ASK), and a node restarted in the middle of streams ends nothing in a hang."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from gateway.backends.synthetic import synthetic_tokens
from gateway.cluster import build_cluster
from gateway.cluster.base import StreamEvent, StreamMeta, TokenBatch
from gateway.supervise import supervise
from gateway.wire.events import Done, Usage
from tests.conftest import require_program
from tests.redis_support import PrivateRedisCluster, unique_prefix
from tests.support import SECRET, ServerProcess, connected, metric_value, mint, recv_until, stream_text, terminal_for
from tests.test_cluster_parts import Started, settings_for, texts_of

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def gateway_env(url: str, **extra: str) -> dict[str, str]:
    env = {
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_WS_PING_INTERVAL_S": "0",
        "GATEWAY_CLUSTER_URL": url,
        "GATEWAY_REDIS_CLUSTER": "true",
        "GATEWAY_REDIS_PREFIX": unique_prefix(),
        "GATEWAY_BACKEND": "synthetic",
        "GATEWAY_SYNTHETIC_TTFT_MS": "0",
        "GATEWAY_SYNTHETIC_TOKENS_PER_S": "200",
        "GATEWAY_NODE_TTL_S": "1",
        "GATEWAY_RESUME_GRACE_S": "10",
    }
    env.update(extra)
    return env


async def metrics_of(server: ServerProcess) -> str:
    async with httpx.AsyncClient(base_url=server.http) as http:
        return (await http.get("/metrics")).text


async def test_room_traffic_reaches_only_the_processes_with_members_in_the_room(redis_cluster_url: str) -> None:
    """4 processes, 100 rooms, each room's members on one process: each process receives
    exactly the room messages of its own rooms (it published them all), none of the
    other 75 rooms'."""
    processes, rooms_each = 4, 25
    env = gateway_env(redis_cluster_url, GATEWAY_SYNTHETIC_TOKENS_PER_S="0", GATEWAY_MAX_ROOMS_PER_CONNECTION="32")
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(ServerProcess(env)) for _ in range(processes)]

        ready = 0
        all_ready = anyio.Event()
        checked = anyio.Event()

        async def members_on(index: int, server: ServerProcess) -> None:
            nonlocal ready
            rooms = [f"room-{index}-{n}" for n in range(rooms_each)]
            async with connected(server, mint(f"user-{index}", rooms="*")) as first, \
                    connected(server, mint(f"other-{index}", rooms="*")) as second:
                for ws in (first, second):
                    for room in rooms:
                        await ws.send(json.dumps({"type": "join", "room": room}))
                        await recv_until(ws, joined(room))
                # A room generation: its start, tokens and end go to the room's members.
                await first.send(json.dumps({"type": "generate", "id": "g", "room": rooms[0], "prompt": "p",
                                             "max_tokens": 50}))
                frames = await recv_until(second, terminal_for("g"), timeout=20)
                assert stream_text(frames, "g") == "".join(synthetic_tokens("p", 50))
                ready += 1
                if ready == processes:
                    all_ready.set()
                # Members stay until the counts are read: a last leave unsubscribes first.
                await checked.wait()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index, server in enumerate(servers):
                    tg.start_soon(members_on, index, server)
                await all_ready.wait()
                await check_counts(servers, rooms_each)
                checked.set()


def joined(room: str) -> Callable[[dict[str, Any]], bool]:
    return lambda frame: frame["type"] == "joined" and frame["room"] == room


async def check_counts(servers: list[ServerProcess], rooms_each: int) -> None:
    """Each process received what it published to its rooms (its own messages come back),
    and nothing more."""
    for server in servers:
        while True:
            text = await metrics_of(server)
            received = metric_value(text, 'gateway_backplane_received_total{purpose="room"}')
            published = metric_value(text, 'gateway_backplane_published_total{purpose="room"}')
            # Joins and the generation: more than the joins alone.
            assert published > 2 * rooms_each
            if received == published:
                break
            assert received < published, "a process received another process's room traffic"
            await anyio.sleep(0.05)


def slot_owner(port: int, slot: int) -> tuple[str, int]:
    """(node id, port) of the primary that owns ``slot``, as the node at ``port`` sees it."""
    import redis

    client = redis.Redis(port=port, decode_responses=True)
    try:
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return str(primary[2]), int(primary[1])
    finally:
        client.close()
    raise AssertionError(f"nobody owns slot {slot}")


def move_slot(ports: list[int], slot: int) -> int:
    """Moves ``slot`` and its keys to another primary, as ``redis-cli --cluster reshard``
    does (IMPORTING, MIGRATING, MIGRATE, then NODE everywhere). Returns the new port."""
    target_id, target_port = begin_move(ports, slot)
    end_move(ports, slot, target_id)
    return target_port


def redirects(ports: list[int], kind: str) -> int:
    """How many ``MOVED`` or ``ASK`` answers the nodes have given."""
    import redis

    total = 0
    for port in ports:
        stats = redis.Redis(port=port, decode_responses=True).info("errorstats")
        total += int(stats.get(f"errorstat_{kind}", {}).get("count", 0))
    return total


def begin_move(ports: list[int], slot: int) -> tuple[str, int]:
    """The first half of a move: the slot's keys are on the target, which the source still
    owns; a command on them gets ASK. Returns the target's id and port."""
    import redis

    source_id, source_port = slot_owner(ports[0], slot)
    target_port = next(port for port in ports if port != source_port)
    target_id = redis.Redis(port=target_port, decode_responses=True).execute_command("CLUSTER", "MYID")
    source = redis.Redis(port=source_port, decode_responses=True)
    target = redis.Redis(port=target_port, decode_responses=True)
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
    return str(target_id), target_port


def end_move(ports: list[int], slot: int, target_id: str) -> None:
    import redis

    for port in ports:
        redis.Redis(port=port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisCluster]:
    """A Redis Cluster of this module's own: its tests move slots and restart nodes."""
    servers = PrivateRedisCluster(tmp_path_factory.mktemp("own-cluster"), require_program("redis-server"),
                                  require_program("redis-cli"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@contextlib.asynccontextmanager
async def started_on(url: str) -> AsyncIterator[Any]:
    """A cluster whose loops are supervised, as the gateway's are: restarted when they fail."""
    cluster = Started(build_cluster(settings_for(resume_ttl_s=60, cluster_url=url, redis_cluster=True)))
    await cluster.cluster.start(lambda name, loop: cluster.spawn(name, functools.partial(supervise, name, loop)))
    try:
        yield cluster
    finally:
        await cluster.aclose()


async def test_a_user_moved_to_another_node_mid_stream_is_followed(own_cluster: PrivateRedisCluster) -> None:
    from redis.crc import key_slot

    async with started_on(own_cluster.url) as cluster:
        store = cluster.store
        meta = StreamMeta(user="mover", id="m1", epoch="e", node=cluster.node_id, created_at=time.time())
        assert await store.create(meta)
        await store.write(meta, TokenBatch(0, ("a", "b")))
        received: list[StreamEvent] = []

        async def follow() -> None:
            async for event in store.follow(meta, -1):
                received.append(event)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                while texts_of(received)[1] != "ab":
                    await anyio.sleep(0.01)
                slot = key_slot(b"mover")
                before = slot_owner(own_cluster.ports[0], slot)[1]
                target_id, after = await anyio.to_thread.run_sync(begin_move, own_cluster.ports, slot)
                assert after != before
                # Mid-move: the source answers ASK for the keys it handed over.
                asked = redirects(own_cluster.ports, "ASK")
                await store.write(meta, TokenBatch(2, ("c",)))
                assert redirects(own_cluster.ports, "ASK") > asked
                while texts_of(received)[1] != "abc":
                    await anyio.sleep(0.01)
                await anyio.to_thread.run_sync(end_move, own_cluster.ports, slot, target_id)
                # The client's map still names the old node: MOVED sends it to the new one.
                moved = redirects(own_cluster.ports, "MOVED")
                await store.write(meta, TokenBatch(3, ("d",)))
                assert redirects(own_cluster.ports, "MOVED") > moved
                await store.finish(meta, Done("stop", Usage(1, 4)))
        assert texts_of(received) == (0, "abcd") and received[-1] == Done("stop", Usage(1, 4))
        assert [m.id for m in await store.resumable("mover")] == ["m1"]
        assert await cluster.limits.add_connection("mover") is not None


async def test_a_room_whose_channel_moved_to_another_node_is_still_received(own_cluster: PrivateRedisCluster) -> None:
    """A sharded subscription lives on the node that owns its channel's slot: when the slot
    moves, the node ends the subscription and the backplane subscribes again where the
    slot went."""
    from gateway.cluster.control import Presence, RoomEvents
    from gateway.cluster.redis.context import slot_of

    async with started_on(own_cluster.url) as cluster:
        received: list[Any] = []
        cluster.backplane.set_handler(received.append)
        await cluster.backplane.subscribe_room("moving")
        message = RoomEvents("moving", (Presence("u1", "join"),))
        with anyio.fail_after(10):
            while message not in received:
                await cluster.backplane.publish(message)
                await anyio.sleep(0.05)
        slot = slot_of(cluster.context.channel("room", "moving"))
        await anyio.to_thread.run_sync(move_slot, own_cluster.ports, slot)
        received.clear()
        with anyio.fail_after(15):
            while message not in received:
                with contextlib.suppress(Exception):
                    await cluster.backplane.publish(message)
                await anyio.sleep(0.1)


async def test_a_node_restarted_mid_stream_ends_nothing_in_a_hang(own_cluster: PrivateRedisCluster) -> None:
    """Local streams complete; followers on another process recover or end with an error
    frame, within a bound."""
    env = gateway_env(own_cluster.url, GATEWAY_SYNTHETIC_TOKENS_PER_S="100", GATEWAY_RESUME_GRACE_S="30")
    users = [f"fault-{index}" for index in range(6)]
    tokens = 500
    results: dict[str, dict[str, Any]] = {}
    with ServerProcess(env) as a, ServerProcess(env) as b:
        restarted = anyio.Event()
        streaming = anyio.Event()
        started_count = 0

        async def local_stream(user: str) -> None:
            nonlocal started_count
            async with connected(a, mint(user)) as ws:
                await ws.send(json.dumps({"type": "generate", "id": "s", "prompt": user, "max_tokens": tokens}))
                frames = await recv_until(ws, lambda f: f["type"] == "token" and f["seq"] >= 20)
                started_count += 1
                if started_count == len(users):
                    streaming.set()
                frames += await recv_until(ws, terminal_for("s"), timeout=40)
            results[f"local {user}"] = {"end": frames[-1], "text": stream_text(frames, "s")}

        async def follower(user: str) -> None:
            await streaming.wait()
            async with connected(b, mint(user)) as ws:
                await ws.send(json.dumps({"type": "resume", "id": "s", "after": -1}))
                frames = await recv_until(ws, terminal_for("s"), timeout=60)
            results[f"follower {user}"] = {"end": frames[-1], "text": stream_text(frames, "s")}

        async def restart_a_node() -> None:
            await streaming.wait()
            await anyio.sleep(0.5)  # the followers are tailing by now
            port = own_cluster.ports[1]
            await anyio.to_thread.run_sync(own_cluster.stop_node, port)
            await anyio.sleep(1.0)
            await anyio.to_thread.run_sync(own_cluster.start_node, port)
            await anyio.to_thread.run_sync(own_cluster.wait_ok)
            restarted.set()

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(restart_a_node)
                for user in users:
                    tg.start_soon(local_stream, user)
                    tg.start_soon(follower, user)
        assert restarted.is_set()
    expected = {user: "".join(synthetic_tokens(user, tokens)) for user in users}
    for user in users:
        local = results[f"local {user}"]
        assert local["end"]["type"] == "done" and local["text"] == expected[user]
        follower_result = results[f"follower {user}"]
        end = follower_result["end"]
        if end["type"] == "done":
            assert follower_result["text"] == expected[user]
        else:
            # Its stored tokens were on the restarted node, which keeps nothing on disk.
            assert end["type"] == "error" and end["code"] in ("unavailable", "backend_error"), end
            assert expected[user].startswith(follower_result["text"])
