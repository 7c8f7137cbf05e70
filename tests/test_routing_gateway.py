"""Routes through the gateway: a real uvicorn gateway, a real WebSocket client and three real
local upstreams (the fault-injecting ``FakeUpstream``)."""

from __future__ import annotations

import json
import logging
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.backends.router import RouterBackend
from tests.conftest import Serve
from tests.fake_upstream import FakeUpstream, Plan
from tests.support import SECRET, ServerProcess, ServerThread, connected, mint, recv_until, stream_text, terminal_for
from tests.test_routing import openai, routed

pytestmark = pytest.mark.anyio

KEY_A = "sk-route-a-5f4e3d2c1b0a99887766"
KEY_B = "sk-route-b-0a1b2c3d4e5f66778899"
ANSWER = "the quick brown fox jumps over the lazy dog and keeps on running far away"


@pytest.fixture
def upstreams() -> Iterator[list[FakeUpstream]]:
    with FakeUpstream() as a, FakeUpstream() as b, FakeUpstream() as c:
        yield [a, b, c]


async def generate(server: Any, stream_id: str, prompt: str = "one two three", **fields: Any) -> list[dict[str, Any]]:
    async with connected(server, mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": stream_id, "prompt": prompt, **fields}))
        return await recv_until(ws, terminal_for(stream_id), timeout=20)


def seeded(server: ServerThread) -> ServerThread:
    """The router's random choices made repeatable: with the weights of these tests, the
    heavy deployment is the first choice."""
    router = server.hub.backend
    assert isinstance(router, RouterBackend)
    router.rng = random.Random(0)
    return server


def assert_seq_runs(frames: list[dict[str, Any]], deltas: int) -> None:
    """One seq space with no gap: a frame's ``seq`` is the last of the run it carries."""
    seqs = [f["seq"] for f in frames if f["type"] in ("token", "reasoning", "tool_call")]
    assert seqs == sorted(set(seqs)) and seqs[-1] == deltas - 1


def three(upstreams: list[FakeUpstream], **route: Any) -> dict[str, Any]:
    """Route ``chat`` over a (heavily weighted, so it is tried first), b and c."""
    a, b, c = upstreams
    return {"routes": {"chat": {**route, "deployments": [openai("a", a, weight=1000), openai("b", b),
                                                         openai("c", c)]}}}


async def test_a_deployment_nobody_listens_on_is_passed_over(serve: Serve, upstreams: list[FakeUpstream]) -> None:
    _, b, c = upstreams
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    routes = {"routes": {"chat": {"deployments": [openai("a", None, base_url=dead, weight=1000), openai("b", b),
                                                  openai("c", c)]}}}
    server = seeded(serve(routed(routes)))
    for index in range(4):
        frames = await generate(server, f"d{index}")
        assert frames[-1]["type"] == "done" and stream_text(frames, f"d{index}") == "one two three"
    assert frames[-1]["route"]["deployments"][-1] in ("b", "c")
    metrics = server.app.state.hub.metrics.render().decode()
    assert 'gateway_route_requests_total{deployment="a",outcome="error",route="chat"}' in metrics


@pytest.mark.parametrize("fault", ["500", "hang", "429"])
async def test_a_failure_before_the_first_token_is_served_by_another_deployment(
        serve: Serve, upstreams: list[FakeUpstream], fault: str) -> None:
    a, b, c = upstreams
    a.default = {
        "500": Plan(kind="status", status=500, body='{"error": {"message": "boom"}}'),
        "hang": Plan(kind="hang_before"),
        "429": Plan(kind="status", status=429, headers={"retry-after": "30"}, body="{}"),
    }[fault]
    server = seeded(serve(routed(three(upstreams), upstream_first_token_timeout_s=0.5)))
    for index in range(6):
        frames = await generate(server, f"s{index}")
        done = frames[-1]
        assert done["type"] == "done", done
        assert stream_text(frames, f"s{index}") == "one two three"
        assert done["route"]["name"] == "chat" and done["route"]["deployments"][-1] in ("b", "c")
        assert_seq_runs(frames, 3)
    assert a.generation_requests()  # a was tried, and the client never saw its failure
    if fault == "429":
        assert len(a.generation_requests()) == 1  # skipped for its Retry-After
    assert len(b.generation_requests()) + len(c.generation_requests()) == 6


async def test_another_4xx_is_the_requests_fault_and_is_not_retried(
        serve: Serve, upstreams: list[FakeUpstream]) -> None:
    a, b, c = upstreams
    a.default = Plan(kind="status", status=400, body='{"error": {"message": "context too long"}}')
    server = seeded(serve(routed(three(upstreams))))
    frames = await generate(server, "bad")
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "backend_error" and "context too long" in error["message"]
    assert error["route"] == {"name": "chat", "deployments": ["a"]}
    assert not b.generation_requests() and not c.generation_requests()


async def test_retries_then_fallbacks_then_the_last_error(serve: Serve, upstreams: list[FakeUpstream]) -> None:
    a, b, c = upstreams
    for upstream in (a, b):
        upstream.default = Plan(kind="status", status=503, body="{}")
    routes = {"default_route": "chat", "routes": {
        "chat": {"retries": 1, "fallbacks": ["small"], "deployments": [openai("a", a, weight=1000), openai("b", b)]},
        "small": {"deployments": [openai("s", c)]},
    }}
    server = seeded(serve(routed(routes)))
    frames = await generate(server, "f")
    assert frames[-1]["type"] == "done" and frames[-1]["route"] == {"name": "chat", "deployments": ["a", "b", "s"]}
    assert stream_text(frames, "f") == "one two three"
    c.default = Plan(kind="status", status=502, body="{}")
    frames = await generate(server, "g")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "backend_error"
    assert "502" in frames[-1]["message"] and frames[-1]["route"]["deployments"][-1] == "s"


async def test_model_names_a_route(serve: Serve, upstreams: list[FakeUpstream]) -> None:
    a, b, _ = upstreams
    routes = {"default_route": "big", "routes": {"big": {"deployments": [openai("a", a)]},
                                                 "small": {"deployments": [openai("b", b)]}}}
    server = seeded(serve(routed(routes)))
    async with connected(server, mint()) as ws:
        assert ws.hello["routes"] == ["big", "small"]
    frames = await generate(server, "x", model="small")
    assert frames[-1]["route"] == {"name": "small", "deployments": ["b"]}
    assert b.last().body["model"] == "fake-model"  # the deployment's model, not the route's name
    frames = await generate(server, "y")
    assert frames[-1]["route"] == {"name": "big", "deployments": ["a"]}
    frames = await generate(server, "w", "one two three four", max_tokens=2)
    assert frames[-1]["finish_reason"] == "length" and frames[-1]["route"] == {"name": "big", "deployments": ["a"]}
    frames = await generate(server, "z", model="gpt-9")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "bad_request"
    assert "big" in frames[-1]["message"] and "small" in frames[-1]["message"]


@pytest.mark.parametrize("fault", ["drop", "end_early", "hang_mid"])
async def test_a_stream_cut_mid_way_is_continued_on_another_deployment(
        serve: Serve, upstreams: list[FakeUpstream], fault: str) -> None:
    a, b, c = upstreams
    a.default = Plan(kind=fault, after=4)
    server = seeded(serve(routed(three(upstreams, on_midstream_failure="continue"), upstream_idle_timeout_s=0.5)))
    frames = await generate(server, "cont", ANSWER, max_tokens=100)
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop", done
    assert stream_text(frames, "cont") == ANSWER  # exactly: nothing repeated, nothing missing
    words = ANSWER.split(" ")
    assert_seq_runs(frames, len(words))
    assert done["route"]["deployments"][0] == "a" and len(done["route"]["deployments"]) == 2
    assert done["usage"]["completion_tokens"] == len(words)
    second = (b.generation_requests() or c.generation_requests())[-1].body
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False
    assert second["messages"][-1] == {"role": "assistant", "content": " ".join(words[:4]) + " "}
    assert second["messages"][0]["role"] == "user" and second["max_tokens"] == 100 - 4


async def test_without_continue_a_mid_stream_failure_ends_the_stream(
        serve: Serve, upstreams: list[FakeUpstream]) -> None:
    a, b, c = upstreams
    a.default = Plan(kind="drop", after=2)
    server = seeded(serve(routed(three(upstreams))))
    frames = await generate(server, "cut", ANSWER)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "backend_error"
    assert stream_text(frames, "cut") == "the quick "
    assert frames[-1]["route"] == {"name": "chat", "deployments": ["a"]}
    assert not b.generation_requests() and not c.generation_requests()


async def test_a_failure_inside_reasoning_is_not_continued(serve: Serve, upstreams: list[FakeUpstream]) -> None:
    a, b, c = upstreams
    events = [{"choices": [{"index": 0, "delta": {"reasoning_content": word}}]} for word in ("let ", "me ", "think")]
    a.default = Plan(kind="replay", body="".join(f"data: {json.dumps(e)}\n\n" for e in events))
    server = seeded(serve(routed(three(upstreams, on_midstream_failure="continue"))))
    frames = await generate(server, "r", ANSWER)
    assert "".join(f["text"] for f in frames if f["type"] == "reasoning") == "let me think"
    assert frames[-1]["type"] == "error" and frames[-1]["route"]["deployments"] == ["a"]
    assert not b.generation_requests() and not c.generation_requests()


async def test_secrets_stay_out_of_frames_logs_metrics_and_admin_output(
        serve: Serve, upstreams: list[FakeUpstream], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("ROUTE_KEY_A", KEY_A)
    monkeypatch.setenv("ROUTE_KEY_B", KEY_B)
    a, b, _ = upstreams
    # a echoes its key back in an error; b serves.
    a.default = Plan(kind="status", status=500, body=json.dumps({"error": {"message": f"bad key {KEY_A}"}}))
    routes = {"routes": {"chat": {"retries": 0, "deployments": [
        openai("a", a, api_key_env="ROUTE_KEY_A", weight=1000)]},
        "other": {"deployments": [openai("b", b, api_key_env="ROUTE_KEY_B")]}}}
    server = seeded(serve(routed(routes)))
    frames = await generate(server, "k", model="chat")
    frames += await generate(server, "l", model="other")
    assert a.last().headers["authorization"] == f"Bearer {KEY_A}"
    assert b.last().headers["authorization"] == f"Bearer {KEY_B}"
    async with httpx.AsyncClient() as client:
        admin = await client.get(server.http + "/admin/routes",
                                 headers={"Authorization": f"Bearer {mint('root', roles=['admin'])}"})
        forbidden = await client.get(server.http + "/admin/routes", headers={"Authorization": f"Bearer {mint()}"})
        metrics = await client.get(server.http + "/metrics")
    assert admin.status_code == 200 and forbidden.status_code == 403
    outputs = [json.dumps(frames), admin.text, metrics.text, caplog.text]
    for key in (KEY_A, KEY_B):
        for output in outputs:
            assert key not in output and key[8:20] not in output
    body = admin.json()
    deployment_a = body["routes"]["chat"]["deployments"][0]
    assert deployment_a["name"] == "a" and deployment_a["requests"] == {"error": 1}
    assert body["routes"]["other"]["deployments"][0]["requests"] == {"ok": 1}
    assert 'gateway_route_requests_total{deployment="b",outcome="ok",route="other"} 1.0' in metrics.text
    assert 'gen_ai_server_time_to_first_token_seconds_count{deployment="b",route="other"} 1.0' in metrics.text
    assert 'gateway_route_cooldown{deployment="a",route="chat"} 0.0' in metrics.text


async def test_a_deployment_that_refuses_to_continue_passes_the_continuation_on(
        serve: Serve, upstreams: list[FakeUpstream]) -> None:
    a, b, c = upstreams
    a.default = Plan(kind="drop", after=3)
    b.default = Plan(kind="status", status=400, body='{"error": {"message": "unknown field continue_final_message"}}')
    # No retries: a continuation is not a retry, and goes on to each deployment in turn.
    routes = {"routes": {"chat": {"on_midstream_failure": "continue", "retries": 0, "deployments": [
        openai("a", a, weight=10000), openai("b", b, weight=100), openai("c", c, weight=1)]}}}
    server = seeded(serve(routed(routes)))
    frames = await generate(server, "p", ANSWER)
    assert frames[-1]["type"] == "done", frames[-1]
    assert stream_text(frames, "p") == ANSWER
    assert frames[-1]["route"]["deployments"] == ["a", "b", "c"]


async def test_gateway_serve_with_a_toml_routes_file(tmp_path: Path, upstreams: list[FakeUpstream]) -> None:
    a, b, _ = upstreams
    path = tmp_path / "routes.toml"
    path.write_text(f"""
default_route = "chat"

[[routes.chat.deployments]]
name = "a"
backend = "openai"
base_url = "{a.base_url}"
model = "fake-model"
api_key_env = "ROUTE_KEY_A"

[[routes.small.deployments]]
name = "s"
backend = "openai"
base_url = "{b.base_url}"
""")
    env = {"GATEWAY_ROUTES_FILE": str(path), "ROUTE_KEY_A": KEY_A, "GATEWAY_JWT_SECRET": SECRET,
           "GATEWAY_LOG_LEVEL": "info"}
    with ServerProcess(env) as server:
        async with connected(server, mint()) as ws:
            assert ws.hello["routes"] == ["chat", "small"]
            await ws.send(json.dumps({"type": "generate", "id": "t", "prompt": "from a file"}))
            frames = await recv_until(ws, terminal_for("t"), timeout=20)
    assert stream_text(frames, "t") == "from a file"
    assert frames[-1]["route"] == {"name": "chat", "deployments": ["a"]}
    assert a.last().headers["authorization"] == f"Bearer {KEY_A}"
    assert KEY_A not in server.output
