"""Routes: the file and its validation, the health rules with time injected, and the router
backend against real local upstreams (the fault-injecting ``FakeUpstream``)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from config import Settings
from config.routes import Cooldown, Deployment
from gateway.backends import FinishChunk, GenerationRequest, TokenChunk
from gateway.backends.route_health import COOLDOWN, HEALTHY, PROBING, DeploymentState, pick
from gateway.backends.router import RouterBackend
from gateway.wire.errors import GatewayError
from tests.fake_upstream import FakeUpstream, Plan
from tests.support import ROOT, make_settings

pytestmark = pytest.mark.anyio


def openai(name: str, upstream: FakeUpstream | None = None, **extra: Any) -> dict[str, Any]:
    base_url = upstream.base_url if upstream is not None else "http://127.0.0.1:9/v1"
    return {"name": name, "backend": "openai", "base_url": base_url, "model": "fake-model", **extra}


def routed(routes: dict[str, Any], **overrides: Any) -> Settings:
    values: dict[str, Any] = {"upstream_first_token_timeout_s": 5.0, "upstream_idle_timeout_s": 5.0,
                              "upstream_retry_backoff_s": 0.01, **overrides}
    return make_settings(routes=routes, **values)


@pytest.fixture
def upstreams() -> Iterator[list[FakeUpstream]]:
    with FakeUpstream() as a, FakeUpstream() as b, FakeUpstream() as c:
        yield [a, b, c]


@contextlib.asynccontextmanager
async def started(settings: Settings, **kwargs: Any) -> AsyncIterator[RouterBackend]:
    router = RouterBackend(settings, **kwargs)
    await router.start()
    try:
        yield router
    finally:
        await router.aclose()


async def run(router: RouterBackend, prompt: str = "one two three", **fields: Any) -> tuple[str, FinishChunk]:
    request = GenerationRequest(id="s", user="u", max_tokens=fields.pop("max_tokens", 64), prompt=prompt, **fields)
    text = ""
    finish = None
    async for chunk in router.stream(request):
        if isinstance(chunk, TokenChunk):
            text += chunk.text
        elif isinstance(chunk, FinishChunk):
            finish = chunk
    assert finish is not None
    return text, finish


# The file ----------------------------------------------------------------------------------

EXAMPLE_JSON = """{
  "default_route": "chat",
  "cooldown": {"allowed_fails": 3, "window_s": 30, "cooldown_s": 30},
  "routes": {
    "chat": {
      "strategy": "weighted", "retries": 2, "fallbacks": ["chat-small"], "on_midstream_failure": "continue",
      "deployments": [
        {"name": "a", "backend": "openai", "base_url": "http://10.0.0.5:8000/v1", "model": "llama-70b",
         "api_key_env": "KEY_A", "weight": 3, "max_concurrency": 64},
        {"name": "b", "backend": "openai", "base_url": "http://10.0.0.6:8000/v1", "model": "llama-70b", "weight": 1}
      ]
    },
    "chat-small": {"deployments": [{"name": "s", "backend": "openai", "base_url": "http://10.0.0.7:8000/v1",
                                     "model": "llama-8b"}]}
  }
}"""

EXAMPLE_TOML = """
default_route = "chat"

[cooldown]
allowed_fails = 3
window_s = 30
cooldown_s = 30

[routes.chat]
strategy = "weighted"
retries = 2
fallbacks = ["chat-small"]
on_midstream_failure = "continue"

[[routes.chat.deployments]]
name = "a"
backend = "openai"
base_url = "http://10.0.0.5:8000/v1"
model = "llama-70b"
api_key_env = "KEY_A"
weight = 3
max_concurrency = 64

[[routes.chat.deployments]]
name = "b"
backend = "openai"
base_url = "http://10.0.0.6:8000/v1"
model = "llama-70b"
weight = 1

[[routes.chat-small.deployments]]
name = "s"
backend = "openai"
base_url = "http://10.0.0.7:8000/v1"
model = "llama-8b"
"""


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_the_example_file_in_json_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    monkeypatch.setenv("KEY_A", "sk-route-a-0123456789abcdef")
    path = tmp_path / f"routes{suffix}"
    path.write_text(EXAMPLE_JSON if suffix == ".json" else EXAMPLE_TOML)
    settings = Settings(_env_file=None, routes_file=str(path))
    assert settings.routes is not None
    chat = settings.routes.routes["chat"]
    assert [d.name for d in chat.deployments] == ["a", "b"]
    assert chat.fallbacks == ["chat-small"] and chat.on_midstream_failure == "continue"
    key = chat.deployments[0].backend_settings
    assert key is not None and key.model_dump()["api_key"].get_secret_value() == "sk-route-a-0123456789abcdef"
    assert settings.routes.route_for(None) == "chat" and settings.routes.route_for("chat-small") == "chat-small"


def test_inline_routes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", "sk-route-a-0123456789abcdef")
    monkeypatch.setenv("GATEWAY_ROUTES", EXAMPLE_JSON)
    settings = Settings(_env_file=None)
    assert settings.routes is not None and list(settings.routes.routes) == ["chat", "chat-small"]


def test_inline_routes_that_are_not_json_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ROUTES", "{bad")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    error = caught.value.errors()[0]
    assert error["loc"] == ("routes",) and "not valid JSON" in error["msg"]


def test_a_deployment_does_not_read_the_backends_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_OPENAI_API_KEY", "sk-global-0123456789abcdef")
    settings = routed({"routes": {"r": {"deployments": [openai("a")]}}})
    assert settings.routes is not None
    own = settings.routes.routes["r"].deployments[0].backend_settings
    assert own is not None and own.model_dump()["api_key"] is None


def _error(routes: Any) -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, routes=routes)
    error = caught.value.errors()[0]
    return ".".join(str(part) for part in error["loc"]), error["msg"]


@pytest.mark.parametrize(("routes", "where", "says"), [
    ({"routes": {"r": {"deployments": [openai("a", base_url="ftp://x")]}}},
     "routes.routes.r.deployments.0.base_url", "http"),
    ({"routes": {"r": {"deployments": [openai("a"), openai("a")]}}}, "routes.routes.r.deployments.1.name", "unique"),
    ({"routes": {"r": {"deployments": [openai("a")]}, "q": {"deployments": [openai("a")]}}},
     "routes.routes.q.deployments.0.name", "unique"),
    ({"routes": {"r": {"fallbacks": ["nope"], "deployments": [openai("a")]}}}, "routes.routes.r.fallbacks.0", "nope"),
    ({"default_route": "nope", "routes": {"r": {"deployments": [openai("a")]}}}, "routes.default_route", "nope"),
    ({"routes": {"r": {"deployments": [openai("a", api_key="sk-in-the-file-0123456789")]}}},
     "routes.routes.r.deployments.0.api_key", "api_key_env"),
    ({"routes": {"r": {"deployments": [openai("a", api_key_env="ROUTES_TEST_UNSET")]}}},
     "routes.routes.r.deployments.0.api_key_env", "ROUTES_TEST_UNSET"),
    ({"routes": {"r": {"deployments": [openai("a", bogus=1)]}}}, "routes.routes.r.deployments.0.bogus", "not a field"),
    ({"routes": {"r": {"deployments": [{"name": "a", "backend": "nope"}]}}},
     "routes.routes.r.deployments.0.backend", "unknown backend"),
    ({"routes": {"r": {"strategy": "fastest", "deployments": [openai("a")]}}}, "routes.routes.r.strategy", ""),
    ({"routes": {"r": {"deployments": []}}}, "routes.routes.r.deployments", ""),
])
def test_a_bad_route_names_its_field(routes: Any, where: str, says: str) -> None:
    loc, message = _error(routes)
    assert loc == where and says in message
    assert "sk-in-the-file" not in message


def test_a_bad_file_stops_the_gateway_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('[[routes.chat.deployments]]\nname = "a"\nbackend = "openai"\nbase_url = "ftp://x"\n')
    env = {**os.environ, "GATEWAY_ROUTES_FILE": str(path), "GATEWAY_AUTH": "none", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "GATEWAY_ROUTES_FILE routes.chat.deployments.0.base_url" in done.stderr
    path.write_text("{not toml")
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "GATEWAY_ROUTES_FILE" in done.stderr and "not valid TOML" in done.stderr


# Health, with time passed in ------------------------------------------------------------------

def state(name: str = "a", **fields: Any) -> DeploymentState:
    return DeploymentState(Deployment(name=name, backend="echo", **fields), "r")


def test_a_cooldown_after_allowed_fails_within_the_window_then_one_probe() -> None:
    policy = Cooldown(allowed_fails=2, window_s=10, cooldown_s=30)
    s = state()
    assert not s.failed(0.0, policy, probe=False)
    # The first failure left the window: this one is the first again.
    assert not s.failed(11.0, policy, probe=False)
    assert s.failed(12.0, policy, probe=False)
    assert s.phase(12.0) == COOLDOWN and not s.available(41.9)
    assert s.phase(42.0) == PROBING and s.available(42.0)
    probe = s.begin(42.0)
    assert probe and not s.available(42.0)  # one probe at a time
    s.end(probe)
    assert s.failed(43.0, policy, probe=True)  # the probe failed: another cooldown
    assert s.phase(43.0) == COOLDOWN and s.phase(73.0) == PROBING
    probe = s.begin(73.0)
    s.succeeded(0.1)
    s.end(probe)
    assert s.phase(73.0) == HEALTHY and not s.fails


def test_failures_after_first_tokens_still_add_up_to_a_cooldown() -> None:
    policy = Cooldown(allowed_fails=2, window_s=10, cooldown_s=30)
    s = state()
    for now in (1.0, 2.0):
        s.succeeded(0.1)  # the first token came, then the stream broke
        cooled = s.failed(now, policy, probe=False)
    assert cooled and s.phase(2.0) == COOLDOWN


def test_a_429_skips_a_deployment_for_its_retry_after_without_a_cooldown() -> None:
    s = state()
    s.rate_limited(5.0, 2.0)
    assert not s.available(6.9) and s.available(7.0) and s.phase(6.0) == HEALTHY


def test_max_concurrency_is_a_cap() -> None:
    s = state(max_concurrency=2)
    s.begin(0.0)
    s.begin(0.0)
    assert s.at_cap()
    s.end(False)
    assert not s.at_cap()


def test_least_busy_picks_the_idle_one() -> None:
    busy, idle = state("busy"), state("idle")
    busy.begin(0.0)
    rng = random.Random(1)
    assert {pick("least_busy", [busy, idle], rng).name for _ in range(50)} == {"idle"}


def test_lowest_latency_mostly_picks_the_fastest_and_explores_the_others() -> None:
    fast, slow = state("fast"), state("slow")
    rng = random.Random(2)
    first = {pick("lowest_latency", [fast, slow], rng).name for _ in range(20)}
    assert first == {"fast", "slow"}  # no figure yet: both are tried
    fast.succeeded(0.05)
    slow.succeeded(0.5)
    picks = [pick("lowest_latency", [fast, slow], rng).name for _ in range(1000)]
    assert 0.8 < picks.count("fast") / 1000 < 0.97 and "slow" in picks


# The router over real upstreams ---------------------------------------------------------------

async def test_weights_3_to_1_over_400_requests(upstreams: list[FakeUpstream]) -> None:
    a, b, _ = upstreams
    a.keep_alive = b.keep_alive = True
    settings = routed({"routes": {"r": {"deployments": [openai("a", a, weight=3), openai("b", b, weight=1)]}}})
    async with started(settings, rng=random.Random(7)) as router:
        for _ in range(400):
            text, _finish = await run(router, "hi there")
            assert text == "hi there"
    share = len(a.generation_requests()) / 400
    # 3:1 is 75 %; with 400 requests the standard deviation is about 2.2 points.
    assert 0.68 <= share <= 0.82, share


async def test_least_busy_sends_the_next_request_to_the_idle_deployment(upstreams: list[FakeUpstream]) -> None:
    a, b, _ = upstreams
    for upstream in (a, b):
        upstream.default = Plan(delay_s=0.3)
    settings = routed({"routes": {"r": {"strategy": "least_busy",
                                         "deployments": [openai("a", a), openai("b", b)]}}})
    async with started(settings) as router, anyio.create_task_group() as tg:
        tg.start_soon(run, router, "one two three")
        with anyio.fail_after(5):
            while not (a.generation_requests() or b.generation_requests()):
                await anyio.sleep(0.01)
        await run(router, "four five")
    assert len(a.generation_requests()) == len(b.generation_requests()) == 1


async def test_lowest_latency_sends_most_requests_to_the_fastest(upstreams: list[FakeUpstream]) -> None:
    a, b, _ = upstreams
    a.keep_alive = b.keep_alive = True
    a.default = Plan(first_delay_s=0.1)
    settings = routed({"routes": {"r": {"strategy": "lowest_latency",
                                         "deployments": [openai("slow", a), openai("fast", b)]}}})
    async with started(settings, rng=random.Random(3)) as router:
        for _ in range(60):
            await run(router, "hi")
        figures = {d["name"]: d["ttft_avg_s"] for d in router.snapshot()["routes"]["r"]["deployments"]}
    assert figures["slow"] > figures["fast"]
    # 10 % explore: about 6 of 60, plus the first request that measured it.
    assert 1 <= len(a.generation_requests()) <= 15 and len(b.generation_requests()) >= 45


async def test_a_cooldown_then_a_probe_that_ends_it(upstreams: list[FakeUpstream]) -> None:
    a, b, _ = upstreams
    a.default = Plan(kind="status", status=500, body='{"error": {"message": "down"}}')
    now = [0.0]
    settings = routed({"cooldown": {"allowed_fails": 2, "window_s": 60, "cooldown_s": 30},
                       "routes": {"r": {"strategy": "least_busy", "deployments": [openai("a", a), openai("b", b)]}}})
    async with started(settings, clock=lambda: now[0]) as router:
        while len(a.generation_requests()) < 2:
            text, _finish = await run(router)
            assert text == "one two three"
        assert router.snapshot()["routes"]["r"]["deployments"][0]["state"] == COOLDOWN
        for _ in range(5):
            _text, finish = await run(router)
            assert finish.route is not None and finish.route.deployments == ("b",)
        assert len(a.generation_requests()) == 2
        now[0] = 31.0  # the cooldown is over: the next request to a is the probe
        a.default = Plan()
        while len(a.generation_requests()) < 3:
            await run(router)
        assert router.snapshot()["routes"]["r"]["deployments"][0]["state"] == HEALTHY


async def test_a_failed_probe_starts_another_cooldown(upstreams: list[FakeUpstream]) -> None:
    a, b, _ = upstreams
    a.default = Plan(kind="status", status=503, body="{}")
    now = [0.0]
    settings = routed({"cooldown": {"allowed_fails": 1, "window_s": 60, "cooldown_s": 30},
                       "routes": {"r": {"strategy": "least_busy", "deployments": [openai("a", a), openai("b", b)]}}})
    async with started(settings, clock=lambda: now[0]) as router:
        while not a.generation_requests():
            await run(router)
        now[0] = 30.0
        while len(a.generation_requests()) < 2:
            await run(router)
        assert router.snapshot()["routes"]["r"]["deployments"][0]["state"] == COOLDOWN
        now[0] = 59.0
        for _ in range(3):
            await run(router)
        assert len(a.generation_requests()) == 2


async def holding_the_slot(router: Any) -> None:
    """Until the route's one deployment has a request in flight."""
    with anyio.fail_after(5):
        while router.states["r"][0].in_flight < 1:
            await anyio.sleep(0.005)


@pytest.mark.slow
async def test_every_deployment_at_its_cap_waits_then_too_many_streams(upstreams: list[FakeUpstream]) -> None:
    a = upstreams[0]
    a.default = Plan(delay_s=0.2)
    settings = routed({"routes": {"r": {"deployments": [openai("a", a, max_concurrency=1)]}}},
                      route_queue_timeout_s=0.2)
    async with started(settings) as router:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, router, "one two three four five")
            await holding_the_slot(router)
            with pytest.raises(GatewayError) as caught:
                await run(router)
            assert caught.value.code == "too_many_streams"
        # With room to wait, the second request gets the slot when the first ends.
        settings = settings.model_copy(update={"route_queue_timeout_s": 5.0})
    async with started(settings) as router, anyio.create_task_group() as tg:
        tg.start_soon(run, router, "one two three")
        await holding_the_slot(router)
        text, _finish = await run(router, "four five")
        assert text == "four five"


def test_routes_inline_and_in_a_file_are_refused_together(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(EXAMPLE_JSON.replace('"api_key_env": "KEY_A", ', ""))
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, routes_file=str(path), routes={"routes": {"r": {"deployments": [openai("a")]}}})
    assert caught.value.errors()[0]["loc"] == ("routes_file",)


def test_done_route_is_encoded_and_survives_the_store() -> None:
    from gateway.cluster.control import terminal_from_dict, terminal_to_dict
    from gateway.wire.events import Done, RouteTrace, Usage
    from gateway.wire.outbound import encode_terminal

    done = Done("stop", Usage(3, 9), RouteTrace("chat", ("a", "b")))
    assert terminal_from_dict(terminal_to_dict(done)) == done
    assert terminal_from_dict(terminal_to_dict(Done("stop"))) == Done("stop")
    assert encode_terminal("r1", done).endswith(',"route":{"name":"chat","deployments":["a","b"]}}')


async def test_a_feature_no_deployment_of_the_route_has_is_refused_naming_the_field() -> None:
    from gateway.backends import Tool

    settings = routed({"routes": {"r": {"deployments": [{"name": "e", "backend": "echo"}]}}})
    async with started(settings) as router:
        with pytest.raises(GatewayError) as caught:
            await run(router, tools=(Tool("lookup"),))
        assert caught.value.code == "bad_request" and "tools" in caught.value.message
        with pytest.raises(GatewayError) as caught:
            await run(router, model="nope")
        assert caught.value.code == "bad_request" and "routes: r" in caught.value.message
        text, finish = await run(router, "plain text", model="r")
        assert text == "plain text" and finish.route is not None and finish.route.deployments == ("e",)
