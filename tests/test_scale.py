"""Several gateway processes sharing a real Redis act as one gateway."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from gateway.backends.synthetic import synthetic_tokens
from tests.redis_support import TEST_REDIS_URL, PrivateRedis, require_redis, unique_prefix
from tests.support import (
    ROOT,
    SECRET,
    ServerProcess,
    ServerThread,
    connected,
    make_settings,
    metric_value,
    mint,
    recv_json,
    recv_until,
    stream_text,
    terminal_for,
    ws_connect,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def cluster_env(redis_url: str = TEST_REDIS_URL, **extra: str) -> dict[str, str]:
    env = {
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_WS_PING_INTERVAL_S": "0",
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": unique_prefix(),
        "GATEWAY_BACKEND": "synthetic",
        "GATEWAY_SYNTHETIC_TTFT_MS": "0",
        "GATEWAY_SYNTHETIC_TOKENS_PER_S": "200",
        "GATEWAY_NODE_TTL_S": "1",
        "GATEWAY_RESUME_GRACE_S": "10",
    }
    env.update(extra)
    return env


@contextlib.contextmanager
def two_gateways(env: dict[str, str]) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with ServerProcess(env) as a, ServerProcess(env) as b:
        yield a, b


async def metric(server: ServerProcess, name: str) -> float:
    async with httpx.AsyncClient(base_url=server.http) as http:
        return metric_value((await http.get("/metrics")).text, name)


async def wait_metric(server: ServerProcess, name: str, value: float, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while await metric(server, name) != value:
            await anyio.sleep(0.05)


@pytest.fixture(autouse=True)
def _redis() -> None:
    require_redis()


@pytest.fixture(params=["redis", "redis-cluster"])
def engine(request: pytest.FixtureRequest) -> dict[str, str]:
    """The settings of the Redis a test's gateways share: one server, or a Redis Cluster."""
    if request.param == "redis":
        return {"GATEWAY_REDIS_URL": TEST_REDIS_URL}
    return {"GATEWAY_REDIS_URL": request.getfixturevalue("redis_cluster_url"), "GATEWAY_REDIS_CLUSTER": "true"}


async def test_drop_on_one_process_resume_on_another(engine: dict[str, str]) -> None:
    with two_gateways(cluster_env(**engine)) as (a, b):
        async with connected(a, mint("ann")) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "x", "prompt": "story", "max_tokens": 400}))
            first = await recv_until(ws, lambda f: f["type"] == "token" and f["seq"] >= 50)
        after = max(f["seq"] for f in first if f["type"] == "token")
        async with connected(b, mint("ann")) as ws:
            assert any(r["id"] == "x" for r in ws.hello["resumable"])
            await ws.send(json.dumps({"type": "resume", "id": "x", "after": after}))
            rest = await recv_until(ws, terminal_for("x"), timeout=20)
    assert rest[0]["resumed"] is True and rest[0]["epoch"] == first[0]["epoch"]
    assert stream_text(first, "x") + stream_text(rest, "x") == "".join(synthetic_tokens("story", 400))
    assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "length"


async def test_cancel_on_one_process_stops_the_generation_on_another(engine: dict[str, str]) -> None:
    with two_gateways(cluster_env(GATEWAY_SYNTHETIC_TOKENS_PER_S="20", **engine)) as (a, b):
        async with connected(a, mint("bo")) as on_a, connected(b, mint("bo")) as on_b:
            await on_a.send(json.dumps({"type": "generate", "id": "long", "prompt": "p", "max_tokens": 4000}))
            await recv_until(on_a, lambda f: f["type"] == "token")
            assert await metric(a, "gateway_active_generations") == 1
            await on_b.send(json.dumps({"type": "cancel", "id": "long"}))
            answer = (await recv_until(on_b, terminal_for("long")))[-1]
            seen = (await recv_until(on_a, terminal_for("long")))[-1]
            assert answer == seen == {**seen, "type": "done", "finish_reason": "cancelled"}
            await wait_metric(a, "gateway_active_generations", 0)


async def test_broadcast_and_rooms_span_processes(engine: dict[str, str]) -> None:
    with two_gateways(cluster_env(GATEWAY_SYNTHETIC_TOKENS_PER_S="0", **engine)) as (a, b):
        async with connected(a, mint("cy", rooms="*")) as on_a, connected(b, mint("di", rooms=["team"])) as on_b, \
                httpx.AsyncClient(base_url=b.http) as http:
            admin = {"Authorization": f"Bearer {mint('root', roles=['admin'])}"}
            assert (await http.post("/admin/broadcast", json={"data": "hi all"}, headers=admin)).status_code == 202
            for ws in (on_a, on_b):
                assert (await recv_until(ws, lambda f: f["type"] == "broadcast"))[-1]["data"] == "hi all"
            await on_a.send(json.dumps({"type": "join", "room": "team"}))
            await recv_until(on_a, lambda f: f["type"] == "joined")
            await on_b.send(json.dumps({"type": "join", "room": "team"}))
            joined = (await recv_until(on_a, lambda f: f["type"] == "presence"))[-1]
            assert joined == {"type": "presence", "room": "team", "user": "di", "event": "join"}
            await on_a.send(json.dumps({"type": "generate", "id": "ai", "room": "team", "prompt": "t",
                                        "max_tokens": 500}))
            frames_a = await recv_until(on_a, terminal_for("ai"), timeout=20)
            frames_b = await recv_until(on_b, terminal_for("ai"), timeout=20)
    tokens_a = [f for f in frames_a if f["type"] == "token"]
    tokens_b = [f for f in frames_b if f["type"] == "token"]
    assert tokens_a == tokens_b  # same frames, same order
    assert stream_text(frames_a, "ai") == "".join(synthetic_tokens("t", 500))


async def test_per_user_limits_hold_across_processes(engine: dict[str, str]) -> None:
    env = cluster_env(GATEWAY_MAX_CONNECTIONS_PER_USER="1", GATEWAY_USER_GENERATE_RATE_PER_S="0.1",
                      GATEWAY_USER_GENERATE_BURST="2", **engine)
    with two_gateways(env) as (a, b):
        async with connected(a, mint("ed")) as on_a:
            async with ws_connect(b.url, mint("ed")) as on_b:
                with pytest.raises(ConnectionClosed) as info:
                    await recv_json(on_b)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1013
            async with connected(b, mint("fi")) as other:
                for i in range(2):
                    await on_a.send(json.dumps({"type": "generate", "id": f"a{i}", "prompt": "x", "max_tokens": 1}))
                    await recv_until(on_a, terminal_for(f"a{i}"))
                await other.send(json.dumps({"type": "generate", "id": "f", "prompt": "x", "max_tokens": 1}))
                assert (await recv_until(other, terminal_for("f")))[-1]["type"] == "done"
        # ed's burst was spent on A; B refuses him too.
        async with connected(b, mint("ed")) as on_b:
            await on_b.send(json.dumps({"type": "generate", "id": "b", "prompt": "x", "max_tokens": 1}))
            error = (await recv_until(on_b, lambda f: f["type"] == "error"))[-1]
            assert error["code"] == "rate_limited" and error["retry_after_s"] > 0


async def test_a_follower_learns_when_the_producing_process_dies(engine: dict[str, str]) -> None:
    with two_gateways(cluster_env(GATEWAY_SYNTHETIC_TOKENS_PER_S="20", **engine)) as (a, b):
        async with connected(a, mint("gil")) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "doomed", "prompt": "p", "max_tokens": 4000}))
            first = await recv_until(ws, lambda f: f["type"] == "token")
        async with connected(b, mint("gil")) as ws:
            await ws.send(json.dumps({"type": "resume", "id": "doomed", "after": first[-1]["seq"]}))
            await recv_until(ws, lambda f: f["type"] == "token")
            assert a.proc is not None
            a.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            frames = await recv_until(ws, terminal_for("doomed"), timeout=15)
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "backend_error"
        assert time.monotonic() - killed < 8


async def test_redis_restart(tmp_path: Path) -> None:
    redis_server = PrivateRedis(tmp_path)
    redis_server.start()
    try:
        env = cluster_env(redis_server.url, GATEWAY_SYNTHETIC_TOKENS_PER_S="100")
        with two_gateways(env) as (a, b):
            async with connected(a, mint("hu")) as ws, httpx.AsyncClient() as http:
                await ws.send(json.dumps({"type": "generate", "id": "local", "prompt": "p", "max_tokens": 600}))
                frames = await recv_until(ws, lambda f: f["type"] == "token")
                redis_server.stop()
                with anyio.fail_after(10):
                    while (await http.get(f"{a.http}/readyz")).json().get("status") != "degraded":
                        await anyio.sleep(0.1)
                assert await metric(a, "gateway_redis_up") == 0
                # Client and producer share process A: the stream keeps flowing without Redis.
                frames += await recv_until(ws, terminal_for("local"), timeout=20)
                assert stream_text(frames, "local") == "".join(synthetic_tokens("p", 600))
                # A new generation needs the store: refused as worth retrying, not as a bug.
                await ws.send(json.dumps({"type": "generate", "id": "later", "prompt": "p"}))
                refused = (await recv_until(ws, lambda f: f["type"] == "error", timeout=20))[-1]
                assert (refused["id"], refused["code"]) == ("later", "unavailable")
                assert refused["retry_after_s"] > 0
                redis_server.start()
                with anyio.fail_after(15):
                    while (await http.get(f"{a.http}/readyz")).json().get("status") != "ready":
                        await anyio.sleep(0.1)
                    while (await http.get(f"{b.http}/readyz")).json().get("status") != "ready":
                        await anyio.sleep(0.1)
            # Cross-process features work again: resume on B, cancel from B, broadcast to both.
            await _resume_across(a, b)
            async with connected(a, mint("kai")) as on_a, connected(b, mint("kai")) as on_b, \
                    httpx.AsyncClient(base_url=a.http) as http:
                admin = {"Authorization": f"Bearer {mint('root', roles=['admin'])}"}
                # Listeners resubscribe with backoff: broadcast until both sockets have one.
                reached: set[int] = set()
                with anyio.fail_after(15):
                    while reached != {0, 1}:
                        response = await http.post("/admin/broadcast", json={"data": "back"}, headers=admin)
                        assert response.status_code == 202
                        for index, ws in enumerate((on_a, on_b)):
                            if index in reached:
                                continue
                            with anyio.move_on_after(1):
                                frame = (await recv_until(ws, lambda f: f["type"] == "broadcast"))[-1]
                                assert frame["data"] == "back"
                                reached.add(index)
            async with connected(a, mint("hu")) as on_a, connected(b, mint("hu")) as on_b:
                await on_a.send(json.dumps({"type": "generate", "id": "c", "prompt": "p", "max_tokens": 4000}))
                await recv_until(on_a, lambda f: f["type"] == "token")
                # The listeners resubscribe with backoff: retry the cancel until it lands.
                with anyio.fail_after(15):
                    while True:
                        await on_b.send(json.dumps({"type": "cancel", "id": "c"}))
                        with anyio.move_on_after(1):
                            frames = await recv_until(on_a, terminal_for("c"))
                            break
                assert frames[-1]["finish_reason"] == "cancelled"
    finally:
        redis_server.stop()


async def _resume_across(a: ServerProcess, b: ServerProcess) -> None:
    async with connected(a, mint("iv")) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "after-restart", "prompt": "q", "max_tokens": 200}))
        first = await recv_until(ws, lambda f: f["type"] == "token" and f["seq"] >= 20)
    async with connected(b, mint("iv")) as ws:
        await ws.send(json.dumps({"type": "resume", "id": "after-restart", "after": first[-1]["seq"]}))
        rest = await recv_until(ws, terminal_for("after-restart"), timeout=20)
    assert stream_text(first, "after-restart") + stream_text(rest, "after-restart") == "".join(
        synthetic_tokens("q", 200))


def test_redis_unreachable_at_start_names_the_url_without_the_password() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GATEWAY_JWT_SECRET": SECRET,
             "GATEWAY_REDIS_URL": "redis://:hunter2-secret@127.0.0.1:1/0"},
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    assert result.returncode != 0
    assert "cannot reach Redis at redis://***@127.0.0.1:1/0" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2-secret" not in result.stderr


def test_several_workers_need_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GATEWAY_JWT_SECRET": SECRET},
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )
    assert result.returncode != 0
    assert "GATEWAY_REDIS_URL" in result.stderr and "Traceback" not in result.stderr


def test_a_worker_that_dies_at_start_is_restarted_with_backoff_then_given_up_on() -> None:
    require_redis()
    env = {**cluster_env(), "GATEWAY_BACKEND": "tests.plugin_backends:BrokenAtStart", "GATEWAY_PORT": "0",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--workers", "2"], env=env,
                            capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    took = time.monotonic() - started
    assert result.returncode != 0
    assert "died at start 5 times in a row" in result.stderr
    # Each worker's restarts back off 0.5, 1, 2, 4 s; the first to die a fifth time ends it.
    delays = [float(d) for d in re.findall(r"starting another in ([0-9.]+)s", result.stderr)]
    assert set(delays) == {0.5, 1.0, 2.0, 4.0} and all(delays.count(d) <= 2 for d in set(delays))
    assert took >= 0.5 + 1.0 + 2.0 + 4.0
    assert result.stderr.count("the model cannot be loaded") >= 5  # each worker logged why


async def test_workers_share_one_port_and_resume_across_them() -> None:
    env = cluster_env()
    with ServerProcess(env, args=("--workers", "2")) as server:
        for round_ in range(3):
            async with connected(server, mint("jan")) as ws:
                await ws.send(json.dumps({"type": "generate", "id": f"w{round_}", "prompt": "w", "max_tokens": 50}))
                frames = await recv_until(ws, terminal_for(f"w{round_}"))
                assert stream_text(frames, f"w{round_}") == "".join(synthetic_tokens("w", 50))
        server.terminate()
        assert server.wait(30) == 0


@pytest.fixture(scope="module")
def server_pair() -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two gateways in threads sharing Redis, for every example of the property below."""
    require_redis()
    settings_ = make_settings(backend="synthetic", synthetic_tokens_per_s=400, cluster_url=TEST_REDIS_URL,
                              redis_prefix=unique_prefix(), resume_grace_s=10, user_generate_rate_per_s=100,
                              user_generate_burst=100)
    with ServerThread(settings_) as first, ServerThread(settings_) as second:
        yield first, second


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(drops=st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=4),
       hops=st.lists(st.booleans(), min_size=4, max_size=4))
def test_random_drops_and_resumes_lose_and_duplicate_nothing(server_pair: tuple[ServerThread, ServerThread],
                                                             drops: list[int], hops: list[bool]) -> None:
    """Drop the socket after a random number of frames, resume on a random process, repeat."""
    anyio.run(_drops_and_resumes, server_pair, sorted(set(drops)), hops)


async def _drops_and_resumes(servers: tuple[ServerThread, ServerThread], drops: list[int], hops: list[bool]) -> None:
    stream_id = f"h-{time.monotonic_ns()}"
    total = 300
    received: list[dict[str, Any]] = []
    after = -1
    server_index = 0
    for step, drop_after in enumerate([*drops, None]):
        server = servers[server_index]
        async with connected(server, mint("hyp")) as ws:
            if step == 0:
                await ws.send(json.dumps({"type": "generate", "id": stream_id, "prompt": "h", "max_tokens": total}))
            else:
                await ws.send(json.dumps({"type": "resume", "id": stream_id, "after": after}))
            count = 0
            while True:
                frame = await recv_json(ws, timeout=10)
                if frame.get("id") != stream_id:
                    continue
                if frame["type"] == "token":
                    assert frame["seq"] > after, "a token arrived twice"
                    after = frame["seq"]
                    received.append(frame)
                    count += 1
                if frame["type"] in ("done", "error"):
                    assert frame["type"] == "done", frame
                    assert stream_text(received, stream_id) == "".join(synthetic_tokens("h", total))
                    return
                if drop_after is not None and count >= drop_after:
                    break
        server_index = int(hops[step % len(hops)])
    raise AssertionError("the stream never finished")


async def test_500_followers_of_another_process_share_one_read_and_the_pool_stays_free() -> None:
    """Each client resuming a generation that runs elsewhere used to hold a pooled Redis
    connection in a blocking read while no token came, so a few hundred of them exhausted
    the pool, and the pool's timeout was taken for Redis being down. The generations here
    wait seconds for their first token (a slow upstream), then stream."""
    count, per_connection, tokens = 500, 20, 100
    env = cluster_env(
        GATEWAY_SYNTHETIC_TTFT_MS="4000", GATEWAY_SYNTHETIC_TOKENS_PER_S="50",
        GATEWAY_REDIS_MAX_CONNECTIONS="4", GATEWAY_REDIS_POOL_TIMEOUT_S="2", GATEWAY_RESUME_GRACE_S="60",
        GATEWAY_MAX_STREAMS_PER_CONNECTION=str(per_connection), GATEWAY_MAX_STREAMS_PER_USER=str(count),
        GATEWAY_MAX_CONNECTIONS_PER_USER=str(count + 50), GATEWAY_USER_GENERATE_RATE_PER_S="1000",
        GATEWAY_USER_GENERATE_BURST=str(count))
    with two_gateways(env) as (a, b):
        ids = [f"c{index}" for index in range(count)]
        texts: dict[str, str] = {}
        endings: dict[str, str] = {}
        not_ready: list[int] = []
        all_connected = anyio.Event()
        resume_now = anyio.Event()
        connected_count = 0
        followers_done = anyio.Event()

        async def start_some(batch: list[str]) -> None:
            async with connected(a, mint("crowd")) as ws:
                for stream_id in batch:
                    await ws.send(json.dumps({"type": "generate", "id": stream_id, "prompt": stream_id,
                                              "max_tokens": tokens}))
                started: set[str] = set()

                def all_started(frame: dict[str, Any]) -> bool:
                    if frame["type"] == "start":
                        started.add(frame["id"])
                    return len(started) == len(batch)

                await recv_until(ws, all_started, timeout=30)
            # Dropped: the generations go on for the resume grace period.

        async def follow_on_b(stream_id: str) -> None:
            nonlocal connected_count
            async with connected(b, mint("crowd")) as ws:
                connected_count += 1
                if connected_count == count:
                    all_connected.set()
                await resume_now.wait()
                await ws.send(json.dumps({"type": "resume", "id": stream_id, "after": -1}))
                frames = await recv_until(ws, terminal_for(stream_id), timeout=60)
            texts[stream_id] = stream_text(frames, stream_id)
            endings[stream_id] = frames[-1]["type"]

        async def watch_readiness() -> None:
            async with httpx.AsyncClient(base_url=b.http) as http:
                while not followers_done.is_set():
                    status = (await http.get("/readyz")).status_code
                    if status != 200:
                        not_ready.append(status)
                    await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_readiness)
            async with anyio.create_task_group() as followers:
                for stream_id in ids:
                    followers.start_soon(follow_on_b, stream_id)
                with anyio.fail_after(60):
                    await all_connected.wait()
                async with anyio.create_task_group() as starters:
                    for offset in range(0, count, per_connection):
                        starters.start_soon(start_some, ids[offset:offset + per_connection])
                # Every generation is still waiting for its first token: the followers
                # on B wait for the live tail of streams that run on A.
                running_when_followed = await metric(a, "gateway_active_generations")
                resume_now.set()
            followers_done.set()
        assert running_when_followed == count
        assert endings == dict.fromkeys(ids, "done")
        wrong = [i for i in ids if texts[i] != "".join(synthetic_tokens(i, tokens))]
        assert wrong == []
        assert not_ready == []
