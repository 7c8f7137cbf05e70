"""The openai backend against a fault-injecting local upstream."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
from multidict import CIMultiDict

from gateway.backends import FinishChunk, GenerationRequest, TokenChunk
from gateway.backends import openai as openai_module
from gateway.backends import upstream as upstream_module
from gateway.backends.echo import split_words
from gateway.backends.openai import OpenAIBackend
from gateway.backends.upstream import map_finish_reason, retry_after_seconds, sanitize
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import GatewayError
from tests.fake_upstream import FakeUpstream, Plan
from tests.support import (
    ServerThread,
    make_settings,
    mint,
    recv_json,
    recv_until,
    stream_text,
    terminal_for,
    ws_connect,
)

pytestmark = pytest.mark.anyio

API_KEY = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def settings_for(upstream: FakeUpstream, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "backend": "openai",
        "openai_base_url": upstream.base_url,
        "openai_api_key": API_KEY,
        "upstream_first_token_timeout_s": 5.0,
        "upstream_idle_timeout_s": 5.0,
        "upstream_retry_backoff_s": 0.01,
    }
    values.update(overrides)
    return make_settings(**values)


@contextlib.asynccontextmanager
async def started(settings: Any, **kwargs: Any) -> AsyncIterator[OpenAIBackend]:
    backend = OpenAIBackend(settings, **kwargs)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


def request(prompt: str = "the quick brown fox", **kwargs: Any) -> GenerationRequest:
    values: dict[str, Any] = {"id": "s1", "user": "alice", "max_tokens": 64, "prompt": prompt}
    values.update(kwargs)
    return GenerationRequest(**values)


async def collect(backend: OpenAIBackend, req: GenerationRequest) -> tuple[list[str], FinishChunk | None,
                                                                          GatewayError | None]:
    texts: list[str] = []
    finish = None
    try:
        async for chunk in backend.stream(req):
            if isinstance(chunk, TokenChunk):
                texts.append(chunk.text)
            elif isinstance(chunk, FinishChunk):
                finish = chunk
    except GatewayError as exc:
        return texts, finish, exc
    return texts, finish, None


# Streaming ------------------------------------------------------------------------------------


async def test_chat_stream_tokens_usage_and_request_shape(upstream: FakeUpstream) -> None:
    settings = settings_for(upstream, openai_model="m-default", openai_extra_headers="X-Org=acme,X-Tag=a=b")
    async with started(settings) as backend:
        texts, finish, error = await collect(backend, request("say it back\tplease ", temperature=0.5, stop=("x",)))
    assert error is None
    assert texts == split_words("say it back\tplease ")
    assert finish is not None and finish.finish_reason == "stop"
    assert (finish.prompt_tokens, finish.completion_tokens) == (4, 4)
    seen = upstream.last()
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["x-org"] == "acme" and seen.headers["x-tag"] == "a=b"
    assert seen.body["stream"] is True and seen.body["stream_options"] == {"include_usage": True}
    assert seen.body["model"] == "m-default" and seen.body["max_tokens"] == 64
    assert seen.body["messages"] == [{"role": "user", "content": "say it back\tplease "}]
    assert seen.body["temperature"] == 0.5 and seen.body["stop"] == ["x"]


async def test_completions_api_and_messages_flattened(upstream: FakeUpstream) -> None:
    async with started(settings_for(upstream, openai_api="completions")) as backend:
        texts, finish, error = await collect(backend, request("one two three", max_tokens=2))
        assert error is None and "".join(texts) == "one two "
        assert finish is not None and finish.finish_reason == "length"
        assert upstream.last().path == "/v1/completions" and upstream.last().body["prompt"] == "one two three"
        assert "model" not in upstream.last().body


async def test_finish_chunk_with_usage_and_no_done_ends_at_once(upstream: FakeUpstream) -> None:
    upstream.default = Plan(usage_in_finish=True, send_done=False)
    async with started(settings_for(upstream)) as backend:
        started_at = time.monotonic()
        texts, finish, error = await collect(backend, request("a b"))
    assert error is None and texts == ["a ", "b"]
    assert finish is not None and finish.prompt_tokens == 2
    assert time.monotonic() - started_at < openai_module.AFTER_FINISH_GRACE_S


async def test_stream_options_refused_falls_back_to_counting(upstream: FakeUpstream) -> None:
    upstream.default = Plan(kind="reject_stream_options", send_usage=False)
    async with started(settings_for(upstream)) as backend:
        texts, finish, error = await collect(backend, request("x y z"))
        assert error is None and texts == ["x ", "y ", "z"]
        assert finish is not None and finish.prompt_tokens is None and finish.completion_tokens == 3
        first, second = upstream.generation_requests()
        assert "stream_options" in first.body and "stream_options" not in second.body
        await collect(backend, request("again"))
    assert len(upstream.generation_requests()) == 3
    assert "stream_options" not in upstream.last().body


@pytest.mark.parametrize(("upstream_reason", "expected"), [
    ("eos_token", "stop"), ("max_tokens", "length"), ("abort", "cancelled"),
    ("tool_calls", "tool_calls"), ("content_filter", "content_filter"),
])
async def test_finish_reason_mapping(upstream: FakeUpstream, upstream_reason: str, expected: str) -> None:
    upstream.default = Plan(finish_reason=upstream_reason)
    async with started(settings_for(upstream)) as backend:
        _, finish, error = await collect(backend, request("a"))
    assert error is None and finish is not None and finish.finish_reason == expected == map_finish_reason(
        upstream_reason)


async def test_model_allowlist(upstream: FakeUpstream) -> None:
    settings = settings_for(upstream, openai_models="small,large")
    async with started(settings) as backend:
        _, _, error = await collect(backend, request(model="secret-expensive"))
        assert error is not None and error.code is ErrorCode.BAD_REQUEST
        assert upstream.generation_requests() == []
        _, _, error = await collect(backend, request(model="large"))
        assert error is None and upstream.last().body["model"] == "large"
        _, _, error = await collect(backend, request())
        assert error is None and upstream.last().body["model"] == "small"


async def test_by_default_a_client_may_name_only_the_configured_model(upstream: FakeUpstream) -> None:
    async with started(settings_for(upstream, openai_model="m-default")) as backend:
        _, _, error = await collect(backend, request(model="gpt-costly"))
        assert error is not None and error.code is ErrorCode.BAD_REQUEST
        assert "'gpt-costly' is not available" in error.message and "m-default" in error.message
        _, _, error = await collect(backend, request(model="m-default"))
        assert error is None and upstream.last().body["model"] == "m-default"
    async with started(settings_for(upstream)) as backend:  # no model configured: the server chooses
        _, _, error = await collect(backend, request(model="anything"))
        assert error is not None and error.code is ErrorCode.BAD_REQUEST
        assert len(upstream.generation_requests()) == 1  # only the allowed request above went out


async def test_a_star_lets_clients_name_any_model(upstream: FakeUpstream) -> None:
    async with started(settings_for(upstream, openai_models="*", openai_model="m-default")) as backend:
        _, _, error = await collect(backend, request(model="whatever-they-like"))
        assert error is None and upstream.last().body["model"] == "whatever-they-like"
        _, _, error = await collect(backend, request())
        assert error is None and upstream.last().body["model"] == "m-default"


# Faults ----------------------------------------------------------------------------------------


async def test_http_500_is_backend_error_with_status_and_not_retried(upstream: FakeUpstream) -> None:
    upstream.default = Plan(kind="status", status=500, body=json.dumps({"error": {"message": "model exploded"}}))
    async with started(settings_for(upstream)) as backend:
        texts, _, error = await collect(backend, request())
    assert texts == [] and error is not None
    assert error.code is ErrorCode.BACKEND_ERROR and error.extra["upstream_status"] == 500
    assert "model exploded" in error.message
    assert len(upstream.generation_requests()) == 1


async def test_503_is_retried_and_tokens_come_once(upstream: FakeUpstream) -> None:
    upstream.plans.extend([Plan(kind="status", status=503), Plan(kind="drop_before")])
    async with started(settings_for(upstream)) as backend:
        texts, finish, error = await collect(backend, request("only once"))
    assert error is None and texts == ["only ", "once"] and finish is not None
    assert len(upstream.generation_requests()) == 3


async def test_retries_are_bounded(upstream: FakeUpstream) -> None:
    upstream.default = Plan(kind="status", status=502)
    async with started(settings_for(upstream, upstream_retries=2)) as backend:
        _, _, error = await collect(backend, request())
    assert error is not None and error.code is ErrorCode.BACKEND_ERROR and error.extra["upstream_status"] == 502
    assert len(upstream.generation_requests()) == 3


async def test_retries_fit_in_the_first_token_timeout(upstream: FakeUpstream) -> None:
    upstream.default = Plan(kind="status", status=503)
    settings = settings_for(upstream, upstream_retries=1000, upstream_retry_backoff_s=0.05,
                            upstream_first_token_timeout_s=0.6)
    async with started(settings) as backend:
        started_at = time.monotonic()
        _, _, error = await collect(backend, request())
        elapsed = time.monotonic() - started_at
    assert error is not None and error.extra["upstream_status"] == 503
    assert 1 < len(upstream.generation_requests()) < 100
    assert elapsed < 0.6 + 0.6


async def test_429_is_rate_limited_with_the_upstream_hint(upstream: FakeUpstream) -> None:
    upstream.default = Plan(kind="status", status=429, headers={"Retry-After": "7"},
                            body=json.dumps({"error": {"message": "slow down"}}))
    async with started(settings_for(upstream)) as backend:
        _, _, error = await collect(backend, request())
    assert error is not None and error.code is ErrorCode.RATE_LIMITED
    assert error.extra == {"retry_after_s": 7.0, "upstream_status": 429}
    assert len(upstream.generation_requests()) == 1


@pytest.mark.parametrize("echo", [
    "Incorrect API key provided: {key}.",
    "bad header Authorization: Bearer {key}",
    "key={escaped}",
    "{key}" * 10,
])
async def test_an_echoed_api_key_never_reaches_the_client(upstream: FakeUpstream, echo: str) -> None:
    secret_header = "hdr-secret-value-0123"
    message = echo.format(key=API_KEY, escaped=json.dumps(API_KEY)[1:-1].replace("-", "\\u002d"))
    upstream.default = Plan(kind="status", status=401,
                            body=json.dumps({"error": {"message": message + " " + secret_header}}))
    settings = settings_for(upstream, openai_extra_headers=f"X-Secret={secret_header}")
    async with started(settings) as backend:
        _, _, error = await collect(backend, request())
    assert error is not None and error.code is ErrorCode.BACKEND_ERROR and error.extra["upstream_status"] == 401
    shown = json.dumps({"message": error.message, **error.extra})
    for secret in (API_KEY, secret_header):
        assert not any(secret[i:i + 8] in shown for i in range(len(secret) - 7)), shown


async def test_hang_before_headers_is_a_timeout_and_the_request_is_dropped(upstream: FakeUpstream) -> None:
    upstream.default = Plan(kind="hang_headers")
    async with started(settings_for(upstream, upstream_first_token_timeout_s=0.4)) as backend:
        started_at = time.monotonic()
        _, _, error = await collect(backend, request())
        assert error is not None and error.code is ErrorCode.BACKEND_TIMEOUT
        assert 0.35 < time.monotonic() - started_at < 1.5
        assert await anyio.to_thread.run_sync(upstream.last().gone.wait, 2.0)


async def test_hang_before_first_token_is_a_timeout(upstream: FakeUpstream) -> None:
    upstream.default = Plan(kind="hang_before")
    async with started(settings_for(upstream, upstream_first_token_timeout_s=0.4)) as backend:
        texts, _, error = await collect(backend, request())
        assert texts == [] and error is not None and error.code is ErrorCode.BACKEND_TIMEOUT
        assert await anyio.to_thread.run_sync(upstream.last().gone.wait, 2.0)


async def test_hang_mid_stream_is_an_idle_timeout_and_tokens_stay(upstream: FakeUpstream) -> None:
    upstream.default = Plan(kind="hang_mid", after=2)
    async with started(settings_for(upstream, upstream_idle_timeout_s=0.3)) as backend:
        texts, _, error = await collect(backend, request("a b c d"))
        assert texts == ["a ", "b "]
        assert error is not None and error.code is ErrorCode.BACKEND_TIMEOUT
        assert await anyio.to_thread.run_sync(upstream.last().gone.wait, 2.0)


@pytest.mark.parametrize("kind", ["malformed", "drop", "end_early"])
async def test_broken_streams_are_backend_errors_after_valid_tokens(upstream: FakeUpstream, kind: str) -> None:
    upstream.default = Plan(kind=kind, after=1)
    async with started(settings_for(upstream)) as backend:
        texts, finish, error = await collect(backend, request("a b c"))
    assert texts == ["a "] and finish is None
    assert error is not None and error.code is ErrorCode.BACKEND_ERROR
    assert len(upstream.generation_requests()) == 1  # never retried after a token


async def test_unreachable_upstream_is_backend_error() -> None:
    with FakeUpstream() as fake:
        url = fake.base_url
    settings = make_settings(backend="openai", openai_base_url=url, upstream_retry_backoff_s=0.01)
    async with started(settings) as backend:
        _, _, error = await collect(backend, request())
        assert error is not None and error.code is ErrorCode.BACKEND_ERROR
        assert "cannot reach the upstream" in error.message and "refused" in error.message
        assert not await backend.ready()


async def test_aclose_closes_the_upstream_response_at_once(upstream: FakeUpstream) -> None:
    upstream.default = Plan(delay_s=0.05)
    async with started(settings_for(upstream)) as backend:
        iterator = backend.stream(request(" ".join(["w"] * 200)))
        assert isinstance(await anext(iterator), TokenChunk)
        assert isinstance(await anext(iterator), TokenChunk)
        closed_at = time.monotonic()
        await iterator.aclose()  # type: ignore[attr-defined]
        seen = upstream.last()
        assert await anyio.to_thread.run_sync(seen.gone.wait, 2.0)
    assert seen.gone_at - closed_at < 1.0
    assert not seen.completed and seen.tokens_sent < 20


async def test_a_finished_stream_keeps_its_connection_and_an_abandoned_one_does_not(
        upstream: FakeUpstream) -> None:
    upstream.keep_alive = True
    # The body ends a moment after [DONE], as it may when the upstream is busy.
    upstream.default = Plan(end_delay_s=0.05)
    async with started(settings_for(upstream)) as backend:
        for _ in range(3):
            texts, finish, error = await collect(backend, request("one two three"))
            assert error is None and texts == ["one ", "two ", "three"] and finish is not None
        assert upstream.connections == 1  # no new TCP (or TLS) handshake per request
        iterator = backend.stream(request(" ".join(["w"] * 50)))
        assert isinstance(await anext(iterator), TokenChunk)
        await iterator.aclose()  # type: ignore[attr-defined]
        texts, _, error = await collect(backend, request("after"))
        assert error is None and texts == ["after"]
        assert upstream.connections == 2  # the abandoned response's connection was dropped


async def test_requests_go_through_the_configured_proxy(upstream: FakeUpstream) -> None:
    # The fake upstream stands in for the proxy: a request for an http URL sent to a proxy
    # carries the absolute URL in its request line, and the host named there does not exist.
    settings = settings_for(upstream, openai_base_url="http://upstream.invalid/v1",
                            openai_proxy=f"http://127.0.0.1:{upstream.port}")
    async with started(settings) as backend:
        texts, finish, error = await collect(backend, request("via the proxy"))
        assert error is None and texts == ["via ", "the ", "proxy"] and finish is not None
        assert await backend.ready()
    assert [seen.path for seen in upstream.requests] == ["http://upstream.invalid/v1/chat/completions",
                                                         "http://upstream.invalid/v1/models"]


async def test_ready_checks_models_and_caches(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    async with started(settings_for(upstream)) as backend:
        assert await backend.ready()
        assert await backend.ready()
        models = [seen for seen in upstream.requests if seen.path == "/v1/models"]
        assert len(models) == 1 and models[0].headers["authorization"] == f"Bearer {API_KEY}"
        monkeypatch.setattr(openai_module, "READY_CACHE_S", 0.0)
        upstream.models_status = 500
        assert await backend.ready()  # still cached from before
        backend._ready_until = 0.0  # the cache expires
        assert not await backend.ready()


# Event-stream decoding -----------------------------------------------------------------------


async def test_events_split_at_every_byte_with_crlf(upstream: FakeUpstream) -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"content": "héllo "}}]},
        {"choices": [{"index": 0, "delta": {"content": "wörld"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    ]
    raw = "".join(f": keep-alive\r\ndata: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events)
    raw += "data: [DONE]\r\n\r\n"
    upstream.plans.append(Plan(kind="bytewise", body=raw))
    async with started(settings_for(upstream)) as backend:
        texts, finish, error = await collect(backend, request())
    assert error is None and texts == ["héllo ", "wörld"]
    assert finish == FinishChunk("stop", prompt_tokens=4, completion_tokens=2)


async def test_error_event_mid_stream_is_sanitised(upstream: FakeUpstream) -> None:
    body = (f'data: {{"choices":[{{"index":0,"delta":{{"content":"a"}}}}]}}\n\n'
            f'data: {{"error":{{"message":"failed for key {API_KEY}"}}}}\n\n')
    upstream.plans.append(Plan(kind="bytewise", body=body))
    async with started(settings_for(upstream)) as backend:
        texts, _, error = await collect(backend, request())
    assert texts == ["a"] and error is not None and error.code is ErrorCode.BACKEND_ERROR
    assert API_KEY not in error.message and "failed for key" in error.message


def test_sanitize_and_retry_after() -> None:
    assert sanitize("bad key sk-abcdef1234567890 here", ()) == "bad key [redacted] here"
    assert sanitize("line\nbreaks\x00 and  spaces", ()) == "line breaks and spaces"
    assert len(sanitize("x " * 500, ())) == upstream_module.DETAIL_CHARS
    assert sanitize("part abcdefgh-zz", ("0000abcdefgh1111",)) == ""
    assert retry_after_seconds(CIMultiDict({"Retry-After": "2.5"})) == 2.5
    assert retry_after_seconds(CIMultiDict({"retry-after-ms": "1500"})) == 1.5
    assert retry_after_seconds(CIMultiDict({"x-ratelimit-reset-requests": "1m30s"})) == 90.0
    assert retry_after_seconds(CIMultiDict({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after_seconds(CIMultiDict({})) == upstream_module.DEFAULT_RETRY_AFTER_S


# Through the gateway ---------------------------------------------------------------------------


async def test_end_to_end_stream_error_frames_and_cancel(upstream: FakeUpstream) -> None:
    with ServerThread(settings_for(upstream)) as server:
        async with ws_connect(server.url, mint()) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "generate", "id": "ok", "prompt": "through the gateway"}))
            frames = await recv_until(ws, terminal_for("ok"))
            assert stream_text(frames, "ok") == "through the gateway"
            assert frames[-1]["type"] == "done" and frames[-1]["usage"] == {"prompt_tokens": 3,
                                                                            "completion_tokens": 3}

            upstream.plans.append(Plan(kind="status", status=429, headers={"retry-after": "3"}))
            await ws.send(json.dumps({"type": "generate", "id": "limited", "prompt": "x"}))
            frames = await recv_until(ws, terminal_for("limited"))
            assert frames[-1]["type"] == "error" and frames[-1]["code"] == "rate_limited"
            assert frames[-1]["retry_after_s"] == 3 and frames[-1]["upstream_status"] == 429

            upstream.plans.append(Plan(delay_s=0.05))
            await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": " ".join(["w"] * 400)}))
            await recv_until(ws, lambda f: f.get("type") == "token" and f.get("id") == "long")
            await ws.send(json.dumps({"type": "cancel", "id": "long"}))
            cancelled_at = time.monotonic()
            frames = await recv_until(ws, terminal_for("long"))
            assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "cancelled"
            seen = upstream.last()
            assert await anyio.to_thread.run_sync(seen.gone.wait, 2.0)
            assert seen.gone_at - cancelled_at < 1.0 and not seen.completed

        async with httpx.AsyncClient() as client:
            assert (await client.get(server.http + "/readyz")).status_code == 200


async def test_a_closed_socket_closes_the_upstream_response(upstream: FakeUpstream) -> None:
    upstream.default = Plan(delay_s=0.05)
    with ServerThread(settings_for(upstream)) as server:
        async with ws_connect(server.url, mint()) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "generate", "id": "gone", "prompt": " ".join(["w"] * 400)}))
            await recv_until(ws, lambda f: f.get("type") == "token")
        closed_at = time.monotonic()
        seen = upstream.last()
        assert await anyio.to_thread.run_sync(seen.gone.wait, 2.0)
    assert seen.gone_at - closed_at < 1.5 and not seen.completed


async def test_a_stale_close_closes_the_upstream_response(upstream: FakeUpstream) -> None:
    from tests.support import RawClient

    upstream.default = Plan(delay_s=0.05)
    settings = settings_for(upstream, heartbeat_interval_s=0.2, heartbeat_timeout_s=0.6)
    with ServerThread(settings) as server:
        client = RawClient(server.port, mint())
        try:
            client.send_json({"type": "generate", "id": "stale", "prompt": " ".join(["w"] * 400)})
            while not any(f.get("type") == "token" for f in client.frames):
                client.read_some()
            seen = upstream.last()
            # The client now says nothing: after the heartbeat timeout the gateway closes it.
            assert await anyio.to_thread.run_sync(seen.gone.wait, 5.0)
            assert not seen.completed and seen.tokens_sent < 200
            assert server.metric('gateway_closes_total{reason="stale"}') == 1
        finally:
            client.close()


async def test_an_endless_event_from_the_upstream_ends_with_backend_error(upstream: FakeUpstream) -> None:
    # One event that never ends: data lines and no blank line. It must not grow without bound.
    line = 'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n'
    upstream.plans.append(Plan(kind="bytewise", body=line * 200))
    async with started(settings_for(upstream, openai_max_event_bytes=2048)) as backend:
        texts, _, error = await collect(backend, request())
    assert texts == [] and error is not None and error.code is ErrorCode.BACKEND_ERROR
