"""No client can hurt another: floods of control frames, presence floods beside a slow
reader, and the per-connection generation limit counting every kind of stream."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.backends.synthetic import synthetic_tokens
from gateway.cluster.memory import RECORD_BYTES
from tests.conftest import Serve
from tests.support import (
    SECRET,
    ClientConnection,
    RawClient,
    ServerProcess,
    connected,
    metric_value,
    mint,
    recv_until,
    stream_text,
    terminal_for,
)

pytestmark = pytest.mark.anyio


async def collect_frames(ws: ClientConnection, into: list[dict[str, Any]]) -> None:
    try:
        while True:
            into.append(json.loads(await ws.recv()))
    except ConnectionClosed:
        return


async def test_every_frame_type_is_rate_limited_and_the_client_is_told_once(serve: Serve) -> None:
    server = serve(connection_frame_rate_per_s=20, connection_frame_burst=10, backend="synthetic",
                   synthetic_tokens_per_s=200, synthetic_ttft_ms=0)
    frames: list[dict[str, Any]] = []
    sent = 40
    async with connected(server, mint("ann", rooms="*")) as flooder, connected(server, mint("bob")) as other:
        await other.send(json.dumps({"type": "generate", "id": "calm", "prompt": "p", "max_tokens": 40}))
        kinds = [{"type": "ping"}, {"type": "join", "room": "r"}, {"type": "leave", "room": "r"},
                 {"type": "cancel", "id": "nothing"}, {"type": "resume", "id": "nothing"}]
        started = anyio.current_time()
        for i in range(sent):
            await flooder.send(json.dumps(kinds[i % len(kinds)]))
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect_frames, flooder, frames)
            # Every frame was either answered or dropped (and counted) once this holds.
            with anyio.fail_after(10):
                while True:
                    answered = [f for f in frames if f["type"] != "error" or f.get("code") != "rate_limited"]
                    if len(answered) + server.metric("gateway_frames_rate_limited_total") >= sent:
                        break
                    await anyio.sleep(0.01)
            took = anyio.current_time() - started
            calm = await recv_until(other, terminal_for("calm"))
            tg.cancel_scope.cancel()
    told = [f for f in frames if f.get("code") == "rate_limited"]
    assert 1 <= len(told) <= 1 + took  # told at most once a second
    assert told[0]["id"] is None and told[0]["retry_after_s"] > 0
    dropped = server.metric("gateway_frames_rate_limited_total")
    assert 10 <= sent - dropped <= 10 + 20 * took + 1  # the burst, and at most what refilled meanwhile
    # The other connection was not slowed or touched.
    assert stream_text(calm, "calm") == "".join(synthetic_tokens("p", 40))


@pytest.mark.slow
async def test_a_connection_that_keeps_flooding_is_closed_1008_and_no_one_else_is(serve: Serve) -> None:
    server = serve(connection_frame_rate_per_s=20, connection_frame_burst=10, flood_close_s=0.5,
                   backend="synthetic", synthetic_tokens_per_s=100, synthetic_ttft_ms=0)
    frames: list[dict[str, Any]] = []
    async with connected(server, mint("cy")) as flooder, connected(server, mint("di")) as other:
        await other.send(json.dumps({"type": "generate", "id": "calm", "prompt": "q", "max_tokens": 100}))
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect_frames, flooder, frames)
            with anyio.fail_after(10), pytest.raises(ConnectionClosed):
                while True:
                    await flooder.send(json.dumps({"type": "ping"}))
                    await anyio.lowlevel.checkpoint()
            closed_after = anyio.current_time() - started
            calm = await recv_until(other, terminal_for("calm"), timeout=10)
    assert flooder.close_code == 1008
    assert 0.5 <= closed_after < 5
    assert 1 <= len([f for f in frames if f.get("code") == "rate_limited"]) <= closed_after + 1
    assert server.metric('gateway_closes_total{reason="flood"}') == 1
    assert stream_text(calm, "calm") == "".join(synthetic_tokens("q", 100))


@pytest.mark.slow
async def test_a_presence_flood_never_closes_a_slow_member_and_a_room_answer_arrives_exact(serve: Serve) -> None:
    # The member reads about 50 KB a second: enough for the answer's 100 tokens a second,
    # not for the flood's presence frames on top, so its queue fills.
    server = serve(backend="synthetic", synthetic_tokens_per_s=100, synthetic_ttft_ms=0, send_queue_size=8,
                   socket_send_buffer_bytes=4096, connection_frame_rate_per_s=4000, connection_frame_burst=4000)
    member = RawClient(server.port, mint("eve", rooms="*"), recv_buffer=4096)
    try:
        member.send_json({"type": "join", "room": "hall"})
        async with connected(server, mint("fox", rooms="*")) as flooder, \
                connected(server, mint("gil", rooms="*")) as asker:
            await asker.send(json.dumps({"type": "join", "room": "hall"}))
            await recv_until(asker, lambda f: f["type"] == "joined")

            async def flood() -> None:
                while True:
                    await flooder.send(json.dumps({"type": "join", "room": "hall"}))
                    await flooder.send(json.dumps({"type": "leave", "room": "hall"}))
                    await anyio.sleep(0.001)

            def read_slowly() -> None:
                while not any(terminal_for("talk")(f) for f in member.frames):
                    member.read_some(256)
                    assert not member.protocol.close_rcvd, member.protocol.close_rcvd
                    time.sleep(0.005)

            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                # The flooder and the asker read what they are sent (the flooder its acks).
                tg.start_soon(collect_frames, flooder, [])
                tg.start_soon(collect_frames, asker, [])
                # The flood is on before the answer starts.
                with anyio.fail_after(10):
                    while server.metric("gateway_presence_dropped_total") == 0:
                        await anyio.sleep(0.01)
                await asker.send(json.dumps({"type": "generate", "id": "talk", "room": "hall", "prompt": "o",
                                             "max_tokens": 100}))
                with anyio.fail_after(60):
                    await anyio.to_thread.run_sync(read_slowly)
                tg.cancel_scope.cancel()
    finally:
        member.close()
    frames = member.frames
    assert any(f["type"] == "presence" for f in frames)
    assert [f["type"] for f in frames if f.get("id") == "talk"][-1] == "done"
    assert stream_text(frames, "talk") == "".join(synthetic_tokens("o", 100))
    assert server.metric('gateway_closes_total{reason="slow_consumer"}') == 0


async def test_resumes_and_room_generations_count_toward_the_connection_limit(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=5, synthetic_ttft_ms=0, max_streams_per_connection=1,
                   resume_grace_s=30, drain_timeout_s=0)
    async with connected(server, mint("hu", rooms="*")) as first, connected(server, mint("hu", rooms="*")) as second:
        await first.send(json.dumps({"type": "generate", "id": "mine", "prompt": "a", "max_tokens": 100}))
        await recv_until(first, lambda f: f["type"] == "start")
        await second.send(json.dumps({"type": "generate", "id": "theirs", "prompt": "b", "max_tokens": 100}))
        await recv_until(second, lambda f: f["type"] == "start")
        # ``second`` follows one generation already: resuming another is one too many.
        await second.send(json.dumps({"type": "resume", "id": "mine", "after": -1}))
        refused = (await recv_until(second, lambda f: f["type"] == "error"))[-1]
        assert (refused["code"], refused["id"]) == ("too_many_streams", "mine")
        # A room generation this connection started counts too.
        await first.send(json.dumps({"type": "cancel", "id": "mine"}))
        await recv_until(first, terminal_for("mine"))
        await first.send(json.dumps({"type": "join", "room": "den"}))
        await recv_until(first, lambda f: f["type"] == "joined")
        await first.send(json.dumps({"type": "generate", "id": "r1", "room": "den", "prompt": "c", "max_tokens": 100}))
        await recv_until(first, lambda f: f["type"] == "start" and f["id"] == "r1")
        await first.send(json.dumps({"type": "generate", "id": "r2", "room": "den", "prompt": "d", "max_tokens": 9}))
        refused = (await recv_until(first, lambda f: f["type"] == "error"))[-1]
        assert (refused["code"], refused["id"]) == ("too_many_streams", "r2")


async def test_strangers_waiting_to_authenticate_cannot_lock_users_out(serve: Serve) -> None:
    server = serve(max_pending_auth=20, max_connections=30, auth_timeout_s=60)
    async with contextlib.AsyncExitStack() as strangers:
        refused = 0
        for _ in range(40):  # twice the cap, no credentials: they would authenticate by message
            try:
                await strangers.enter_async_context(
                    connect(server.url, open_timeout=15, ping_interval=None))
            except InvalidStatus as exc:
                assert exc.response.status_code == 503
                refused += 1
        assert refused == 20
        assert server.metric('gateway_closes_total{reason="pending_auth_full"}') == 20
        # Neither the cap on waiting sockets nor the connection limit keeps a user out.
        async with connected(server, mint("ike")) as user:
            await user.send(json.dumps({"type": "generate", "id": "in", "prompt": "still here"}))
            frames = await recv_until(user, terminal_for("in"))
        assert stream_text(frames, "in") == "still here"


@pytest.mark.parametrize("auth", ["header", "query", "subprotocol", "message"])
async def test_the_python_client_logs_no_credential_even_at_debug(
        serve: Serve, auth: str, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.client import GatewayClient

    server = serve()
    token = mint("jan")
    with caplog.at_level(logging.DEBUG):
        async with GatewayClient(server.url, token, auth=auth) as client:  # type: ignore[arg-type]
            answer = await client.generate("a secret prompt")
            assert "".join([text async for text in answer]) == "a secret prompt"
    # The client's own records (the server in this test's thread logs apart, redacted by its
    # own logging configuration, which ServerThread does not install).
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name == "gateway.client")
    assert "GET /ws" in logged  # the handshake was logged, redacted
    assert token not in logged and token.split(".")[2] not in logged
    assert "a secret prompt" not in logged


def close_code_of(client: RawClient, timeout: float = 5.0) -> int | None:
    """Read until the server's close frame (or EOF); the close code it carried."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and client.protocol.close_rcvd is None:
        try:
            client.read_some()
        except OSError:
            break
        if client.protocol.state.name == "CLOSED":
            break
    received = client.protocol.close_rcvd
    return received.code if received is not None else None


@pytest.mark.parametrize("shape", ["whole", "fragmented"])
async def test_a_message_over_the_size_limit_closes_1009_whole_or_fragmented(serve: Serve, shape: str) -> None:
    server = serve(max_message_bytes=1024)
    client = RawClient(server.port, mint("kit"))
    try:
        body = json.dumps({"type": "generate", "prompt": "x" * 2000}).encode()
        if shape == "whole":
            client.protocol.send_text(body)
        else:  # fragments each under the limit, the message over it
            for start in range(0, len(body), 500):
                piece = body[start:start + 500]
                if start == 0:
                    client.protocol.send_text(piece, fin=False)
                else:
                    client.protocol.send_continuation(piece, fin=start + 500 >= len(body))
        client._flush()
        assert await anyio.to_thread.run_sync(close_code_of, client) == 1009
    finally:
        client.close()


async def test_compression_is_not_negotiated_so_a_size_limit_cannot_be_inflated_past(serve: Serve) -> None:
    server = serve(max_message_bytes=1024)
    async with connected(server, mint("lou"), compression="deflate") as ws:
        # The server declines permessage-deflate: every frame is counted at its real size.
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.send(json.dumps({"type": "generate", "prompt": "y" * 2000}))  # compressible, not compressed
        with pytest.raises(ConnectionClosed) as info:
            await recv_until(ws, lambda f: False)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_invalid_utf8_in_a_text_frame_closes_1007(serve: Serve) -> None:
    from websockets.frames import Frame as WsFrame
    from websockets.frames import Opcode

    server = serve()
    client = RawClient(server.port, mint("max"))
    try:
        client.protocol.send_frame(WsFrame(Opcode.TEXT, b'{"type":"ping","x":"\xff\xfe"}'))
        client._flush()
        assert await anyio.to_thread.run_sync(close_code_of, client) == 1007
    finally:
        client.close()


@pytest.mark.slow
async def test_a_peer_that_stops_reading_is_torn_down_and_its_generation_detached(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0, synthetic_ttft_ms=0, max_tokens=200000,
                   send_queue_size=8, socket_send_buffer_bytes=4096, slow_consumer_timeout_s=1,
                   tcp_user_timeout_s=1, resume_grace_s=10)
    stalled = RawClient(server.port, mint("ned"), recv_buffer=4096)  # reads nothing more: a zero window
    try:
        stalled.send_json({"type": "generate", "id": "big", "prompt": "z", "max_tokens": 200000})
        started = time.monotonic()
        with anyio.fail_after(1 + 1 + 5):  # the slow-consumer timeout, TCP_USER_TIMEOUT, slack
            while server.metric("gateway_open_connections") > 0:
                await anyio.sleep(0.05)
        torn_down_after = time.monotonic() - started
        assert server.metric('gateway_closes_total{reason="slow_consumer"}') == 1
        # Detached, not cancelled: it runs on, and the user resumes it from another socket.
        assert server.metric("gateway_active_generations") == 1
        async with connected(server, mint("ned")) as again:
            await again.send(json.dumps({"type": "resume", "id": "big", "after": -1}))
            frames = await recv_until(again, lambda f: f["type"] == "token" and f["id"] == "big")
            assert frames[0]["type"] == "start" and frames[0]["resumed"] is True
            await again.send(json.dumps({"type": "cancel", "id": "big"}))
            await recv_until(again, terminal_for("big"), timeout=30)
    finally:
        stalled.close()
    assert torn_down_after < 7


async def scrape(server: ServerProcess, *names: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=server.http) as http:
        text = (await http.get("/metrics")).text
    return {name: metric_value(text, name) for name in names}


@pytest.mark.slow
async def test_twenty_seconds_of_churn_leave_no_descriptor_or_task_behind() -> None:
    names = ("process_open_fds", "gateway_event_loop_tasks", "gateway_open_connections",
             "gateway_active_generations")
    env = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_WS_PING_INTERVAL_S": "0", "GATEWAY_BACKEND": "echo",
           "GATEWAY_ECHO_DELAY_MS": "1", "GATEWAY_RESUME_GRACE_S": "0", "GATEWAY_USER_GENERATE_RATE_PER_S": "1000",
           "GATEWAY_USER_GENERATE_BURST": "1000", "GATEWAY_MAX_CONNECTIONS_PER_USER": "1000"}
    with ServerProcess(env) as server:
        async with connected(server, mint("warm")) as ws:  # warm up: imports, pools, first connection
            await ws.send(json.dumps({"type": "generate", "id": "w", "prompt": "warm up"}))
            await recv_until(ws, terminal_for("w"))
        baseline = await scrape(server, *names)
        made = 0

        async def churn(worker: int) -> None:
            nonlocal made
            deadline = anyio.current_time() + 20
            while anyio.current_time() < deadline:
                made += 1
                kind = made % 3
                if kind == 2:  # a client that vanishes mid-answer, without a close frame
                    raw = RawClient(server.port, mint(f"u{worker}"))
                    raw.send_json({"type": "generate", "prompt": "gone before the end of this answer"})
                    raw.close()
                    continue
                async with connected(server, mint(f"u{worker}")) as ws:
                    await ws.send(json.dumps({"type": "generate", "id": "c", "prompt": "churn churn churn"}))
                    if kind == 0:
                        await recv_until(ws, terminal_for("c"))
                    # kind 1 closes cleanly mid-answer

        async with anyio.create_task_group() as tg:
            for worker in range(4):
                tg.start_soon(churn, worker)
        with anyio.fail_after(15):
            while True:
                after = await scrape(server, *names)
                settled = after["gateway_open_connections"] == 0 and after["gateway_active_generations"] == 0
                if settled and after["process_open_fds"] <= baseline["process_open_fds"] \
                        and after["gateway_event_loop_tasks"] <= baseline["gateway_event_loop_tasks"]:
                    break
                await anyio.sleep(0.2)
    assert made > 200
    assert after["process_open_fds"] <= baseline["process_open_fds"]
    assert after["gateway_event_loop_tasks"] <= baseline["gateway_event_loop_tasks"]


@pytest.mark.slow
async def test_a_running_generation_is_charged_to_the_memory_budget_while_it_streams(serve: Serve) -> None:
    # The memory store has no flusher task: the producer writes between two tokens once a
    # write interval (1 s) has passed. So a generation counts against the budget while it
    # runs, never holds a token it has not sent, and is whole in the store at its end.
    server = serve(backend="synthetic", synthetic_tokens_per_s=200, synthetic_ttft_ms=0)
    store = server.hub.store
    assert store.writes_in_process
    async with connected(server, mint("ann")) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "g", "prompt": "budget", "max_tokens": 400}))
        # 250 tokens at 200 a second: more than one write interval since the first.
        frames = await recv_until(ws, lambda f: f.get("type") == "token" and f["seq"] >= 250)
        assert store.used_bytes > RECORD_BYTES
        frames += await recv_until(ws, terminal_for("g"))
        assert frames[-1]["type"] == "done"
    async with connected(server, mint("ann")) as ws:
        await ws.send(json.dumps({"type": "resume", "id": "g", "after": -1}))
        replayed = await recv_until(ws, terminal_for("g"))
    assert stream_text(replayed, "g") == stream_text(frames, "g") == "".join(synthetic_tokens("budget", 400))


@pytest.mark.slow
async def test_memory_stays_flat_while_millions_of_tokens_flow_through_a_small_store_budget() -> None:
    env = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_WS_PING_INTERVAL_S": "0", "GATEWAY_BACKEND": "synthetic",
           "GATEWAY_SYNTHETIC_TOKENS_PER_S": "0", "GATEWAY_SYNTHETIC_TTFT_MS": "0", "GATEWAY_MAX_TOKENS": "10000",
           "GATEWAY_STORE_MAX_BYTES": str(2 * 1024 * 1024), "GATEWAY_USER_GENERATE_RATE_PER_S": "1000",
           "GATEWAY_USER_GENERATE_BURST": "1000"}
    per_generation, rounds, workers = 10000, 50, 4  # 2,000,000 tokens
    with ServerProcess(env) as server:
        rss: list[int] = []

        async def run(worker: int) -> None:
            async with connected(server, mint(f"w{worker}")) as ws:
                for index in range(rounds):
                    stream_id = f"w{worker}-{index}"
                    await ws.send(json.dumps({"type": "generate", "id": stream_id, "prompt": "m",
                                              "max_tokens": per_generation}))
                    frames = await recv_until(ws, terminal_for(stream_id), timeout=60)
                    assert frames[-1]["usage"]["completion_tokens"] == per_generation
                    if worker == 0 and index in (rounds // 5, rounds - 1):
                        rss.append(server.rss_kb())

        async with anyio.create_task_group() as tg:
            for worker in range(workers):
                tg.start_soon(run, worker)
        evictions = (await scrape(server, "gateway_store_evictions_total"))["gateway_store_evictions_total"]
        async with connected(server, mint("w1")) as ws:  # the first streams are gone: evicted, as after the TTL
            await ws.send(json.dumps({"type": "resume", "id": "w1-0", "after": -1}))
            refused = (await recv_until(ws, lambda f: f["type"] == "error"))[-1]
    assert evictions > 0 and refused["code"] == "not_found"
    # 1.6 million tokens flowed between the two samples: about 100 MB if they were kept.
    assert rss[1] - rss[0] < 20 * 1024, rss
