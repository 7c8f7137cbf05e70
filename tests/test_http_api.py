"""The OpenAI-compatible HTTP API through real clients: the ``openai`` package (sync and
async) and httpx for the raw events, against a real uvicorn. Text, reasoning and tool
calls arrive as the upstream sent them; errors surface as the SDK's own exceptions; the
limits are the socket's; a dropped stream resumes, or with no grace is cancelled."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import openai
import pytest

from tests.conftest import require_program
from tests.fake_upstream import FakeUpstream, Plan
from tests.support import ROOT, Serve, ServerThread, connected, make_settings, mint, recv_until
from tests.test_fidelity import RECORDED, Answer, expected_from, recorded
from tests.test_routing import openai as openai_deployment
from tests.test_routing import routed

pytestmark = pytest.mark.anyio

HELLO: Any = [{"role": "user", "content": "the quick brown fox jumps"}]
WEATHER: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


_OPEN: list[openai.OpenAI] = []


def client(server: ServerThread, token: str | None = None) -> openai.OpenAI:
    """A sync SDK client, closed when the test ends (see ``close_clients``)."""
    sdk = openai.OpenAI(base_url=server.http + "/v1", api_key=token or mint(), max_retries=0)
    _OPEN.append(sdk)
    return sdk


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def async_client(server: ServerThread, token: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.http + "/v1", api_key=token or mint(), max_retries=0)


def bearer(token: str | None = None) -> dict[str, str]:
    return {"authorization": f"Bearer {token or mint()}"}


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def via_upstream(serve: Serve, upstream: FakeUpstream, **overrides: Any) -> ServerThread:
    overrides.setdefault("openai_models", "gpt-4o-mini")
    return serve(make_settings(backend="openai", openai_base_url=upstream.base_url, upstream_idle_timeout_s=10.0,
                               **overrides))


def add_chunk(answer: Answer, chunk: Any) -> None:
    """What the SDK's chunks add up to, as ``tests.test_fidelity`` reads an upstream."""
    if chunk.usage is not None:
        answer.usage = chunk.usage.model_dump(exclude_none=True)
    for choice in chunk.choices:
        delta = choice.delta
        answer.content += delta.content or ""
        answer.reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            entry = answer.calls.setdefault(call.index, {"call_id": "", "name": "", "arguments": ""})
            entry["call_id"] += call.id or ""
            entry["name"] += (call.function.name if call.function else None) or ""
            entry["arguments"] += (call.function.arguments if call.function else None) or ""
        if choice.finish_reason is not None:
            answer.finish_reason = choice.finish_reason


def sse(body: str) -> list[tuple[str | None, str]]:
    """(event id, data) of each event; comments as (None, ': …')."""
    events: list[tuple[str | None, str]] = []
    for block in body.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append((None, block))
            continue
        event_id = None
        data = ""
        for line in block.split("\n"):
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((event_id, data))
    return events


def test_a_completion_without_stream(serve: Serve) -> None:
    server = serve(backend="echo")
    raw = client(server).chat.completions.with_raw_response.create(model="echo", messages=HELLO, max_tokens=3)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert raw.headers["x-generation-id"] == completion.id
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "the quick brown "
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        5, 3, 8)
    assert server.metric('gateway_generations_total{outcome="length",transport="http"}') == 1


async def test_async_streaming_text_with_usage(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=500)
    async with async_client(server) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="synthetic", messages=HELLO, max_tokens=20, stream=True, stream_options={"include_usage": True})
        parsed = raw.parse()
        stream = await parsed if inspect.isawaitable(parsed) else parsed
        chunks = [chunk async for chunk in stream]
    generation_id = raw.headers["x-generation-id"]
    assert {chunk.id for chunk in chunks} == {generation_id}
    assert chunks[0].choices[0].delta.role == "assistant"
    answer = Answer()
    for chunk in chunks:
        add_chunk(answer, chunk)
    assert len(answer.content.split()) == 20
    assert answer.finish_reason == "length"
    assert chunks[-1].choices == [] and answer.usage["completion_tokens"] == 20
    assert chunks[-2].choices[0].finish_reason == "length"


def test_the_raw_events_carry_seq_ids_and_end_with_done(serve: Serve) -> None:
    server = serve(backend="echo")
    with httpx.Client(base_url=server.http) as http:
        response = http.post("/v1/chat/completions", headers=bearer(),
                             json={"model": "echo", "stream": True, "messages": HELLO})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert events[-1] == (None, "[DONE]")
    role, *deltas, finish, _ = events
    assert role[0] is None and json.loads(role[1])["choices"][0]["delta"]["role"] == "assistant"
    ids = [int(event_id) for event_id, _ in deltas if event_id is not None]
    assert ids == sorted(ids) and ids[-1] == 4
    text = "".join(json.loads(data)["choices"][0]["delta"]["content"] for _, data in deltas)
    assert text == "the quick brown fox jumps"
    assert json.loads(finish[1])["choices"][0]["finish_reason"] == "stop"
    assert {json.loads(data)["id"] for _, data in events[:-1]} == {response.headers["x-generation-id"]}


@pytest.mark.parametrize("name", RECORDED)
def test_a_recorded_upstream_stream_reaches_the_sdk(serve: Serve, upstream: FakeUpstream, name: str) -> None:
    """Reasoning, text and tool calls of the shapes upstreams send, assembled by the SDK
    exactly as the upstream sent them, streamed and not."""
    body = recorded(name)
    want = expected_from(body)
    upstream.plans.append(Plan(kind="replay", body=body))
    upstream.plans.append(Plan(kind="replay", body=body))
    server = via_upstream(serve, upstream)
    sdk = client(server)
    got = Answer()
    for chunk in sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True,
                                             stream_options={"include_usage": True}):
        add_chunk(got, chunk)
    assert (got.content, got.reasoning, got.finish_reason) == (want.content, want.reasoning, want.finish_reason)
    assert got.calls == want.calls
    completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    message = completion.choices[0].message
    assert (message.content or "") == want.content
    assert ((message.model_extra or {}).get("reasoning_content") or "") == want.reasoning
    calls = [call.model_dump() for call in message.tool_calls or []]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (call["call_id"], call["name"], call["arguments"]) for _, call in sorted(want.calls.items())]
    assert completion.choices[0].finish_reason == want.finish_reason


async def test_a_tool_call_streams_to_the_async_sdk(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0)
    async with async_client(server) as sdk:
        stream = await sdk.chat.completions.create(model="synthetic", messages=HELLO, tools=WEATHER, stream=True)
        answer = Answer()
        async for chunk in stream:
            add_chunk(answer, chunk)
    assert answer.finish_reason == "tool_calls"
    (call,) = answer.calls.values()
    assert call["name"] == "get_weather" and call["call_id"]
    assert "city" in json.loads(call["arguments"])


def test_errors_are_the_sdks_own_exceptions(serve: Serve) -> None:
    server = serve(backend="echo")
    with pytest.raises(openai.AuthenticationError) as denied:
        client(server, "not-a-jwt").chat.completions.create(model="echo", messages=HELLO)
    assert denied.value.status_code == 401
    assert isinstance(denied.value.body, dict) and denied.value.body["type"] == "authentication_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client(server).chat.completions.create(model="echo", messages=HELLO, n=2)
    assert bad.value.body == {"message": "n: only 1 is supported", "type": "invalid_request_error",
                              "code": "bad_request", "param": "n"}
    with pytest.raises(openai.BadRequestError) as too_many:
        client(server).chat.completions.create(model="echo", messages=HELLO, max_tokens=10**6)
    assert isinstance(too_many.value.body, dict) and too_many.value.body["code"] == "bad_request"
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.retrieve("never-started")
    with pytest.raises(openai.BadRequestError) as unsupported:
        client(server).chat.completions.create(model="echo", messages=HELLO, tools=WEATHER)
    assert "tools" in str(unsupported.value)


def test_a_bad_body_is_a_400_in_openais_shape(serve: Serve) -> None:
    server = serve(backend="echo")
    with httpx.Client(base_url=server.http, headers=bearer()) as http:
        for body in (b"{not json", b"[1]", b'{"model":"m"}', b'{"messages":[{"role":"user","content":3}]}',
                     b'{"messages":[{"role":"wizard","content":"x"}]}', b'{"messages":[],"stream":"yes"}'):
            response = http.post("/v1/chat/completions", content=body)
            assert response.status_code == 400, body
            error = response.json()["error"]
            assert set(error) == {"message", "type", "code", "param"}
            assert "Traceback" not in error["message"]
        assert http.get("/v1/chat/completions/bad%20id").status_code == 404


def test_the_per_user_limit_is_shared_with_the_socket(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=20, max_streams_per_user=1)

    async def hold_a_socket_generation() -> None:
        async with connected(server, mint()) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "held", "prompt": "x", "max_tokens": 200}))
            await recv_until(ws, lambda frame: frame.get("type") == "token")
            with pytest.raises(openai.RateLimitError) as limited:
                await anyio.to_thread.run_sync(
                    lambda: client(server).chat.completions.create(model="synthetic", messages=HELLO))
            assert limited.value.response.headers["retry-after"] == "1"
            assert isinstance(limited.value.body, dict) and limited.value.body["code"] == "too_many_streams"

    anyio.run(hold_a_socket_generation)


def test_the_generate_rate_is_a_429_with_retry_after_and_a_drain_a_503(serve: Serve) -> None:
    server = serve(backend="echo", user_generate_rate_per_s=0.01, user_generate_burst=1)
    sdk = client(server)
    sdk.chat.completions.create(model="echo", messages=HELLO)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.chat.completions.create(model="echo", messages=HELLO)
    assert isinstance(limited.value.body, dict) and limited.value.body["code"] == "rate_limited"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    server.hub.draining = True
    with pytest.raises(openai.InternalServerError) as draining:
        client(server, mint("bob")).chat.completions.create(model="echo", messages=HELLO)
    assert draining.value.status_code == 503
    assert isinstance(draining.value.body, dict) and draining.value.body["code"] == "shutting_down"
    server.hub.draining = False


def test_a_chosen_id_in_use_is_a_409(serve: Serve) -> None:
    server = serve(backend="echo")
    sdk = client(server)
    first = sdk.chat.completions.with_raw_response.create(model="echo", messages=HELLO,
                                                          extra_headers={"X-Generation-Id": "mine-1"})
    assert first.headers["x-generation-id"] == "mine-1" and first.parse().id == "mine-1"
    with pytest.raises(openai.ConflictError) as conflict:
        sdk.chat.completions.create(model="echo", messages=HELLO, extra_headers={"X-Generation-Id": "mine-1"})
    assert conflict.value.response.headers["x-generation-id"] == "mine-1"
    # Scoped to the user: another user may use the same id.
    other = client(server, mint("bob")).chat.completions.create(
        model="echo", messages=HELLO, extra_headers={"X-Generation-Id": "mine-1"})
    assert other.id == "mine-1"


def test_pings_keep_an_idle_stream_open_before_the_first_token(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_ttft_ms=600, heartbeat_interval_s=0.1, heartbeat_timeout_s=1)
    with httpx.Client(base_url=server.http) as http:
        response = http.post("/v1/chat/completions", headers=bearer(),
                             json={"model": "m", "stream": True, "messages": HELLO, "max_tokens": 2})
    events = sse(response.text)
    first_delta = next(index for index, (event_id, _) in enumerate(events) if event_id is not None)
    assert (None, ": ping") in events[:first_delta]
    assert events[-1] == (None, "[DONE]")


def test_a_failure_after_the_start_is_one_error_event_and_no_done(serve: Serve, upstream: FakeUpstream) -> None:
    upstream.plans.append(Plan(kind="drop", tokens=["a", " b", " c"], after=2))
    server = via_upstream(serve, upstream)
    with httpx.Client(base_url=server.http) as http:
        response = http.post("/v1/chat/completions", headers=bearer(),
                             json={"model": "gpt-4o-mini", "stream": True, "messages": HELLO})
    events = sse(response.text)
    assert (None, "[DONE]") not in events
    error = json.loads(events[-1][1])["error"]
    assert error["code"] == "backend_error" and set(error) == {"message", "type", "code", "param"}


def test_a_refusal_before_the_first_delta_is_a_status(serve: Serve, upstream: FakeUpstream) -> None:
    server = via_upstream(serve, upstream)
    with pytest.raises(openai.BadRequestError) as refused:
        client(server).chat.completions.create(model="not-allowed", messages=HELLO, stream=True)
    assert isinstance(refused.value.body, dict) and "not-allowed" in refused.value.body["message"]
    assert refused.value.response.headers["x-generation-id"]


def test_models_lists_what_a_client_may_ask_for(serve: Serve, upstream: FakeUpstream) -> None:
    server = via_upstream(serve, upstream, openai_models="gpt-4o-mini,gpt-4.1")
    assert [model.id for model in client(server).models.list()] == ["gpt-4o-mini", "gpt-4.1"]
    echo = serve(backend="echo")
    assert [model.id for model in client(echo).models.list()] == ["echo"]


def test_routes_are_the_models_and_a_completion_takes_one(serve: Serve, upstream: FakeUpstream) -> None:
    routes = {"default_route": "big", "routes": {"big": {"deployments": [openai_deployment("a", upstream)]},
                                                  "small": {"deployments": [openai_deployment("b", upstream)]}}}
    server = serve(routed(routes))
    sdk = client(server)
    assert [model.id for model in sdk.models.list()] == ["big", "small"]
    completion = sdk.chat.completions.create(model="small", messages=HELLO)
    assert completion.choices[0].message.content == "the quick brown fox jumps"
    assert completion.model == "small"
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.chat.completions.create(model="nope", messages=HELLO, stream=True)
    assert "nope" in str(unknown.value)


def test_cors_answers_the_allowed_origins_only(serve: Serve) -> None:
    server = serve(backend="echo", allowed_origins=["https://app.example"])
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type, x-generation-id"}
    with httpx.Client(base_url=server.http) as http:
        allowed = http.options("/v1/chat/completions", headers={"origin": "https://app.example", **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        refused = http.options("/v1/chat/completions", headers={"origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in refused.headers
        answer = http.post("/v1/chat/completions", headers={"origin": "https://app.example", **bearer()},
                           json={"model": "echo", "messages": HELLO})
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-generation-id" in answer.headers["access-control-expose-headers"]


@pytest.mark.slow
def test_the_readme_curl_streams_as_printed(serve: Serve) -> None:
    require_program("curl")
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("curl -N "))
    server = serve(backend="echo")
    output = subprocess.run(["bash", "-c", command.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")],
                            env={**os.environ, "TOKEN": mint()}, capture_output=True, text=True, timeout=30,
                            check=True).stdout
    events = sse(output)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "hello there"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    printed = readme[readme.index(command):]
    printed = printed[printed.index("```text\n") + 8:printed.index("```", printed.index("```text\n") + 8)]
    # The README shows the same kinds of lines (how many deltas ride in one event depends
    # on timing).
    assert {line.split(":", 1)[0] for line in printed.splitlines()} == {
        line.split(":", 1)[0] for line in output.splitlines()} == {"data", "id", ""}


def test_the_readme_python_lines_run(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "OpenAI(" in b)
    server = serve(backend="echo")
    namespace: dict[str, Any] = {"token": mint()}
    exec(compile(block.replace("http://127.0.0.1:8000", server.http), "README.md", "exec"), namespace)
    namespace["client"].close()
    assert capsys.readouterr().out == "Hello there\n"
