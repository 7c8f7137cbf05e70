"""End to end: a real uvicorn server and the websockets client library."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from gateway.backends.synthetic import synthetic_tokens
from tests import plugin_backends
from tests.support import (
    RawClient,
    Serve,
    connected,
    mint,
    recv_json,
    recv_until,
    stream_text,
    terminal_for,
    ws_connect,
)

pytestmark = pytest.mark.anyio

TICKING = "tests.plugin_backends:TickingBackend"
SILENT = "tests.plugin_backends:SilentBackend"


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition on the server (which runs in another thread)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def test_echo_streams_the_prompt_back_frame_by_frame(serve: Serve) -> None:
    prompt = "Hello,  streaming\tworld!\n  with  whitespace "
    server = serve(echo_delay_ms=1)
    async with connected(server, mint("alice")) as ws:
        hello = ws.hello
        assert hello["type"] == "hello" and hello["user"] == "alice"
        assert hello["protocol"] == "gateway.v1" and hello["heartbeat_s"] == 15
        assert hello["limits"]["max_message_bytes"] == 1 << 20
        await ws.send(json.dumps({"type": "generate", "id": "r1", "prompt": prompt}))
        frames = await recv_until(ws, terminal_for("r1"))
    assert frames[0]["type"] == "start" and frames[0]["id"] == "r1"
    assert frames[0]["epoch"].startswith("e-")
    tokens = [f for f in frames if f["type"] == "token"]
    assert len(tokens) > 1
    assert stream_text(frames, "r1") == prompt
    seqs = [f["seq"] for f in tokens]
    assert seqs == sorted(set(seqs)) and seqs[0] >= 0
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "stop"
    assert frames[-1]["usage"]["completion_tokens"] == seqs[-1] + 1 == 5


async def test_plain_text_frame_is_a_prompt_and_messages_work(serve: Serve) -> None:
    async with connected(serve(), mint()) as ws:
        await ws.send("just typing here")
        frames = await recv_until(ws, lambda f: f["type"] in ("done", "error"))
        stream_id = frames[0]["id"]
        assert frames[0]["type"] == "start" and stream_id.startswith("g-")
        assert stream_text(frames, stream_id) == "just typing here"
        await ws.send(json.dumps({"type": "generate", "id": "m1", "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "echo me"}]}))
        frames = await recv_until(ws, terminal_for("m1"))
        assert stream_text(frames, "m1") == "echo me"


async def test_concurrent_generations_on_one_socket(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=400, synthetic_ttft_ms=5)
    async with connected(server, mint()) as ws:
        for stream_id, n in (("a", 40), ("b", 25), ("c", 60)):
            await ws.send(json.dumps({"type": "generate", "id": stream_id, "prompt": f"p-{stream_id}",
                                      "max_tokens": n}))
        frames: list[dict[str, Any]] = []
        done: set[str] = set()
        with anyio.fail_after(10):
            while done != {"a", "b", "c"}:
                frame = await recv_json(ws)
                frames.append(frame)
                if frame["type"] == "done":
                    done.add(str(frame["id"]))
    for stream_id, n in (("a", 40), ("b", 25), ("c", 60)):
        assert stream_text(frames, stream_id) == "".join(synthetic_tokens(f"p-{stream_id}", n))
        done_frame = next(f for f in frames if f["type"] == "done" and f["id"] == stream_id)
        assert done_frame["finish_reason"] == "length"
        assert done_frame["usage"]["completion_tokens"] == n


async def test_max_tokens_caps_the_answer(serve: Serve) -> None:
    async with connected(serve(), mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "r", "prompt": "a b c d e f", "max_tokens": 2}))
        frames = await recv_until(ws, terminal_for("r"))
    assert stream_text(frames, "r") == "a b "
    assert frames[-1]["finish_reason"] == "length"
    assert frames[-1]["usage"]["completion_tokens"] == 2


async def test_default_max_tokens_applies(serve: Serve) -> None:
    async with connected(serve(backend="synthetic", default_max_tokens=7), mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "r", "prompt": "x"}))
        frames = await recv_until(ws, terminal_for("r"))
    assert frames[-1]["usage"]["completion_tokens"] == 7


async def test_cancel_stops_the_backend_and_ends_with_cancelled(serve: Serve) -> None:
    server = serve(backend=TICKING)
    async with connected(server, mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "cx1", "prompt": "x", "max_tokens": 4000}))
        await recv_until(ws, lambda f: f["type"] == "token")
        assert server.metric("gateway_active_generations") == 1
        sent_at = time.monotonic()
        await ws.send(json.dumps({"type": "cancel", "id": "cx1"}))
        frames = await recv_until(ws, terminal_for("cx1"))
        assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "cancelled"
        record = plugin_backends.record("cx1")
        assert record.closed.wait(1.0), "backend iterator was not closed"
        assert record.closed_at - sent_at < 1.0
        await wait_for(lambda: server.metric("gateway_active_generations") == 0)
        # The connection keeps working after a cancel.
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_until(ws, lambda f: f["type"] == "pong"))[-1] == {"type": "pong"}


async def test_closing_the_socket_cancels_its_generations(serve: Serve) -> None:
    server = serve(backend=TICKING)
    async with connected(server, mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "gone1", "prompt": "x", "max_tokens": 4000}))
        await recv_until(ws, lambda f: f["type"] == "token")
    closed_at = time.monotonic()
    record = plugin_backends.record("gone1")
    assert record.closed.wait(1.0)
    assert record.closed_at - closed_at < 1.0
    await wait_for(lambda: server.metric("gateway_active_generations") == 0, timeout=1.0)
    await wait_for(lambda: server.metric("gateway_open_connections") == 0)


async def test_duplicate_id_and_unknown_cancel(serve: Serve) -> None:
    async with connected(serve(backend=TICKING), mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "dup", "prompt": "x", "max_tokens": 4000}))
        await recv_until(ws, lambda f: f["type"] == "start")
        await ws.send(json.dumps({"type": "generate", "id": "dup", "prompt": "y"}))
        error = (await recv_until(ws, lambda f: f["type"] == "error"))[-1]
        assert error["id"] == "dup" and error["code"] == "duplicate_id"
        await ws.send(json.dumps({"type": "cancel", "id": "nope"}))
        error = (await recv_until(ws, lambda f: f["type"] == "error"))[-1]
        assert error == {"type": "error", "id": "nope", "code": "not_found",
                         "message": "no generation with this id"}
        await ws.send(json.dumps({"type": "cancel", "id": "dup"}))
        await recv_until(ws, terminal_for("dup"))
        # Finished but still resumable: the id stays taken for the resume TTL.
        await ws.send(json.dumps({"type": "generate", "id": "dup", "prompt": "z", "max_tokens": 1}))
        error = (await recv_until(ws, lambda f: f["type"] == "error"))[-1]
        assert error["id"] == "dup" and error["code"] == "duplicate_id"


async def test_limits_per_connection_and_per_user(serve: Serve) -> None:
    server = serve(backend=TICKING, max_streams_per_connection=2, max_streams_per_user=3)
    async with connected(server, mint("bob")) as ws1, connected(server, mint("bob")) as ws2:
        for i in range(3):
            await ws1.send(json.dumps({"type": "generate", "id": f"a{i}", "prompt": "x", "max_tokens": 4000}))
        error = (await recv_until(ws1, lambda f: f["type"] == "error"))[-1]
        assert error["id"] == "a2" and error["code"] == "too_many_streams"
        await ws2.send(json.dumps({"type": "generate", "id": "b0", "prompt": "x", "max_tokens": 4000}))
        await recv_until(ws2, lambda f: f["type"] == "start")
        await ws2.send(json.dumps({"type": "generate", "id": "b1", "prompt": "x", "max_tokens": 4000}))
        error = (await recv_until(ws2, lambda f: f["type"] == "error"))[-1]
        assert error["id"] == "b1" and error["code"] == "too_many_streams"
        assert "per user" in error["message"]


async def test_rate_limit_says_when_to_retry(serve: Serve) -> None:
    async with connected(serve(user_generate_rate_per_s=0.5, user_generate_burst=2), mint("carol")) as ws:
        for i in range(3):
            await ws.send(json.dumps({"type": "generate", "id": f"r{i}", "prompt": "hi"}))
        frames = await recv_until(ws, lambda f: f["type"] == "error")
    error = frames[-1]
    assert error["id"] == "r2" and error["code"] == "rate_limited"
    assert 0 < error["retry_after_s"] <= 2.0


async def test_bad_input_gets_error_frames_and_the_connection_keeps_working(serve: Serve) -> None:
    async with connected(serve(max_prompt_chars=10, max_tokens=100, default_max_tokens=50), mint()) as ws:
        cases = [
            ("[1,2]", "bad_request", None),
            ("42", "bad_request", None),
            ('"hi"', "bad_request", None),
            ('{"type":"explode","id":"e1"}', "unknown_type", "e1"),
            ('{"type":"generate","id":"e2"}', "bad_request", "e2"),
            ('{"type":"generate","id":"e3","prompt":"x","max_tokens":"many"}', "bad_request", "e3"),
            ('{"type":"generate","id":"e4","prompt":"x","max_tokens":101}', "bad_request", "e4"),
            ('{"type":"generate","id":"e5","prompt":"this is far too long"}', "prompt_too_long", "e5"),
            ('{"type":"cancel"}', "bad_request", None),
            ('{"no":"type"}', "bad_request", None),
        ]
        for text, code, stream_id in cases:
            await ws.send(text)
            error = (await recv_until(ws, lambda f: f["type"] == "error"))[-1]
            assert (error["code"], error["id"]) == (code, stream_id), text
            assert "Traceback" not in error["message"]
        await ws.send(b"\x00\x01binary")
        error = (await recv_until(ws, lambda f: f["type"] == "error"))[-1]
        assert error["code"] == "bad_request" and "binary" in error["message"]
        await ws.send(json.dumps({"type": "generate", "id": "ok", "prompt": "fine"}))
        assert stream_text(await recv_until(ws, terminal_for("ok")), "ok") == "fine"


async def test_a_frame_over_the_size_limit_closes_1009(serve: Serve) -> None:
    async with connected(serve(max_message_bytes=1024), mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "prompt": "x" * 2000}))
        with pytest.raises(ConnectionClosed) as info:
            await recv_until(ws, lambda f: False)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_backend_faults_become_error_frames(serve: Serve) -> None:
    server = serve(backend="tests.plugin_backends:FailingBackend")
    async with connected(server, mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "f1", "prompt": "x"}))
        frames = await recv_until(ws, terminal_for("f1"))
        assert stream_text(frames, "f1") == "one two "
        assert frames[-1] == {"type": "error", "id": "f1", "code": "backend_error",
                              "message": "upstream failed", "upstream_status": 502}
        await ws.send(json.dumps({"type": "generate", "id": "f2", "prompt": "crash"}))
        frames = await recv_until(ws, terminal_for("f2"))
        assert frames[-1] == {"type": "error", "id": "f2", "code": "internal", "message": "internal error"}
        await ws.send(json.dumps({"type": "ping"}))
        await recv_until(ws, lambda f: f["type"] == "pong")
    await wait_for(lambda: server.metric("gateway_active_generations") == 0)


async def test_server_pings_while_waiting_for_the_first_token_and_pong_is_answered(serve: Serve) -> None:
    async with connected(serve(backend=SILENT, heartbeat_interval_s=0.2, heartbeat_timeout_s=5), mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "wait", "prompt": "x"}))
        frames = await recv_until(ws, lambda f: f["type"] == "ping", skip_pings=False, timeout=2)
        assert [f["type"] for f in frames] == ["start", "ping"]
        await ws.send(json.dumps({"type": "pong"}))
        await ws.send(json.dumps({"type": "ping"}))
        await recv_until(ws, lambda f: f["type"] == "pong")


@pytest.mark.slow
async def test_stale_client_is_closed_4000_and_its_generation_cancelled(serve: Serve) -> None:
    """The client's TCP connection stays open but it never reads nor answers."""
    server = serve(backend=TICKING, heartbeat_interval_s=0.2, heartbeat_timeout_s=0.8)
    client = RawClient(server.port, mint())
    try:
        client.send_json({"type": "generate", "id": "stale1", "prompt": "x", "max_tokens": 4000})
        started = time.monotonic()
        record = plugin_backends.record("stale1")
        assert record.started.wait(2)
        assert record.closed.wait(3), "the stale client's generation was not cancelled"
        assert 0.7 < record.closed_at - started < 2.0
        await wait_for(lambda: server.metric("gateway_active_generations") == 0)
        await wait_for(lambda: server.metric('gateway_closes_total{reason="stale"}') == 1)
        # Once the client reads, it finds the 4000 close frame after the buffered frames.
        deadline = time.monotonic() + 5
        while client.protocol.close_rcvd is None and time.monotonic() < deadline:
            client.read_some()
        assert client.protocol.close_rcvd is not None and client.protocol.close_rcvd.code == 4000
    finally:
        client.close()


@pytest.mark.slow
async def test_protocol_level_pongs_count_as_sign_of_life(serve: Serve) -> None:
    """A terminal client like wscat answers protocol pings but sends no app frames."""
    server = serve(heartbeat_interval_s=0.2, heartbeat_timeout_s=0.8, ws_ping_interval_s=0.2, ws_ping_timeout_s=5)
    async with connected(server, mint()) as ws:
        # Reading keeps the client library answering protocol pings; it never sends a frame,
        # and outlives the 0.8 s heartbeat timeout several times over.
        with anyio.move_on_after(2.0):
            while True:
                frame = await recv_json(ws, timeout=3)
                assert frame["type"] == "ping"
        assert server.metric('gateway_closes_total{reason="stale"}') == 0
        await ws.send(json.dumps({"type": "ping"}))
        await recv_until(ws, lambda f: f["type"] == "pong")


async def test_slow_consumer_is_closed_4003_while_others_stream(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0, max_tokens=10_000_000, send_queue_size=16,
                   slow_consumer_timeout_s=0.5, socket_send_buffer_bytes=65536)
    async with connected(server, mint("healthy")) as ws:
        stuck = RawClient(server.port, mint("slow"), recv_buffer=16384)
        try:
            stuck.send_json({"type": "generate", "id": "flood", "prompt": "x", "max_tokens": 10_000_000})
            await ws.send(json.dumps({"type": "generate", "id": "h", "prompt": "q", "max_tokens": 2000}))
            frames = await recv_until(ws, terminal_for("h"))
            assert stream_text(frames, "h") == "".join(synthetic_tokens("q", 2000))
            await wait_for(lambda: server.metric('gateway_closes_total{reason="slow_consumer"}') == 1)
            await wait_for(lambda: server.metric("gateway_active_generations") == 0)
        finally:
            stuck.close()


async def test_coalescing_merges_tokens_for_a_slow_reader_without_loss(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0, max_tokens=50_000)
    async with connected(server, mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "big", "prompt": "p", "max_tokens": 20000}))
        frames = await recv_until(ws, terminal_for("big"), timeout=30)
    tokens = [f for f in frames if f["type"] == "token"]
    assert stream_text(frames, "big") == "".join(synthetic_tokens("p", 20000))
    assert tokens[-1]["seq"] == 19999
    assert len(tokens) < 20000  # merged
    assert server.metric("gateway_coalesced_tokens_total") == 20000 - len(tokens)
    assert server.metric("gateway_tokens_sent_total") == 20000


async def test_server_full_closes_1013_and_per_user_limit(serve: Serve) -> None:
    server = serve(max_connections=2, max_connections_per_user=1)
    async with connected(server, mint("dave")):
        async with ws_connect(server.url, mint("dave")) as second:
            with pytest.raises(ConnectionClosed) as info:
                await recv_json(second)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
            assert "user" in info.value.rcvd.reason
        async with connected(server, mint("erin")), ws_connect(server.url, mint("frank")) as third:
            with pytest.raises(ConnectionClosed) as info:
                await recv_json(third)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
            assert info.value.rcvd.reason == "server full"


@pytest.mark.slow
async def test_expired_token_closes_4001_and_its_generation_runs_on_for_a_resume(serve: Serve) -> None:
    server = serve(backend=TICKING, jwt_leeway_s=0, resume_grace_s=10)
    async with connected(server, mint(ttl=1.5)) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "exp1", "prompt": "x", "max_tokens": 4000}))
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            await recv_until(ws, lambda f: False, timeout=5)
        elapsed = time.monotonic() - started
    assert info.value.rcvd is not None and info.value.rcvd.code == 4001
    assert elapsed < 3.0
    # Detached, not cancelled: a fresh token resumes it.
    assert server.metric("gateway_active_generations") == 1
    async with connected(server, mint()) as again:
        await again.send(json.dumps({"type": "resume", "id": "exp1", "after": 0}))
        resumed = await recv_until(again, lambda f: f["type"] == "token" and f["id"] == "exp1")
        assert resumed[0]["type"] == "start" and resumed[0]["resumed"] is True
        await again.send(json.dumps({"type": "cancel", "id": "exp1"}))
        await recv_until(again, terminal_for("exp1"))
    await wait_for(lambda: server.metric("gateway_active_generations") == 0)


@pytest.mark.slow
async def test_expired_token_frames(serve: Serve) -> None:
    async with connected(serve(backend=TICKING, jwt_leeway_s=0), mint(ttl=1.5)) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "exp2", "prompt": "x", "max_tokens": 4000}))
        frames = await recv_until(ws, lambda f: f["type"] == "error" and f["id"] is None, timeout=5)
    # The generation is not ended for the client: it may resume it with a fresh token.
    assert not [f for f in frames if f["type"] in ("error", "done") and f["id"] == "exp2"]
    assert frames[-1]["code"] == "token_expired" and "resume" in frames[-1]["message"]


async def test_an_internal_failure_closes_1011_not_1006(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    from gateway.connection import Connection

    async def broken(self: Connection, text: str) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(Connection, "_handle_text", broken)
    async with connected(serve(), mint()) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1011


async def test_health_readiness_metrics_and_page(serve: Serve) -> None:
    server = serve()
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        async with connected(server, mint()) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "m", "prompt": "a b c"}))
            await recv_until(ws, terminal_for("m"))
            metrics = (await http.get("/metrics")).text
        assert "gateway_open_connections 1.0" in metrics
        assert "gateway_tokens_sent_total 3.0" in metrics
        assert 'gateway_time_to_first_token_seconds_count{transport="ws"} 1.0' in metrics
        assert 'gateway_generations_total{outcome="stop",transport="ws"} 1.0' in metrics
        page = await http.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower() and "/ws" in page.text


async def test_usage_reported_by_the_backend_survives_the_max_tokens_cap(serve: Serve) -> None:
    async with connected(serve(backend="tests.plugin_backends:UsageBackend"), mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "u", "prompt": "x", "max_tokens": 3}))
        frames = await recv_until(ws, terminal_for("u"))
    assert stream_text(frames, "u") == "w0 w1 w2 "
    assert frames[-1]["finish_reason"] == "length"
    assert frames[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 6}
