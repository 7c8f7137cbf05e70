"""A dropped HTTP stream is not a cancel: it resumes with ``Last-Event-ID`` (or
``starting_after``) on this process or, through Redis, on another, with no gap and no
duplicate; with ``GATEWAY_HTTP_RESUME_GRACE_S=0`` the upstream sees the cancel at once.
``POST /v1/chat/completions/{id}/cancel`` ends a stream anywhere."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.fake_upstream import FakeUpstream, Plan
from tests.redis_support import TEST_REDIS_URL, require_redis, unique_prefix
from tests.support import Serve, ServerThread, make_settings, mint
from tests.tcp_proxy import CuttableProxy
from tests.test_fidelity import Answer, expected_from, recorded

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "go"}]


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def via_upstream(serve: Serve, upstream: FakeUpstream, **overrides: Any) -> ServerThread:
    return serve(make_settings(backend="openai", openai_base_url=upstream.base_url, upstream_idle_timeout_s=10.0,
                               openai_models="gpt-4o-mini", **overrides))


def bearer(user: str = "alice") -> dict[str, str]:
    return {"authorization": f"Bearer {mint(user)}"}


class Events:
    """Server-sent events as they arrive, complete ones only: (id, data) pairs."""

    def __init__(self) -> None:
        self.events: list[tuple[int | None, str]] = []
        self.generation_id = ""
        self.first_delta = anyio.Event()
        self.ended = anyio.Event()

    async def read(self, response: httpx.Response) -> None:
        self.generation_id = response.headers["x-generation-id"]
        block: list[str] = []
        try:
            async for line in response.aiter_lines():
                if line:
                    block.append(line)
                    continue
                event_id = next((int(b[4:]) for b in block if b.startswith("id: ")), None)
                data = next((b[6:] for b in block if b.startswith("data: ")), "")
                block = []
                if data:
                    self.events.append((event_id, data))
                if event_id is not None:
                    self.first_delta.set()
        except httpx.HTTPError:
            pass  # cut
        finally:
            self.ended.set()

    @property
    def last_id(self) -> int:
        return max(event_id for event_id, _ in self.events if event_id is not None)

    def ids(self) -> list[int]:
        return [event_id for event_id, _ in self.events if event_id is not None]


def assemble(*parts: Events) -> Answer:
    answer = Answer()
    for part in parts:
        for _, data in part.events:
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            for choice in chunk.get("choices") or []:
                delta = choice["delta"]
                answer.content += delta.get("content") or ""
                answer.reasoning += delta.get("reasoning_content") or ""
                for call in delta.get("tool_calls") or []:
                    entry = answer.calls.setdefault(call["index"], {"call_id": "", "name": "", "arguments": ""})
                    entry["call_id"] += call.get("id") or ""
                    entry["name"] += call["function"].get("name") or ""
                    entry["arguments"] += call["function"].get("arguments") or ""
                answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
    return answer


async def test_a_stream_cut_by_the_network_resumes_on_another_process(serve: Serve, upstream: FakeUpstream) -> None:
    require_redis()
    body = recorded("openai_parallel_tool_calls")
    plan = Plan(kind="replay", body=body, pause_after=9)
    upstream.plans.append(plan)
    shared = {"cluster_url": TEST_REDIS_URL, "redis_prefix": unique_prefix(), "resume_grace_s": 10}
    producer = via_upstream(serve, upstream, **shared)
    other = via_upstream(serve, upstream, **shared)
    first, resumed = Events(), Events()
    try:
        with CuttableProxy(producer.port) as proxy:
            async with (httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", timeout=10) as http,
                        anyio.create_task_group() as tg):

                async def stream() -> None:
                    with contextlib.suppress(httpx.HTTPError):
                        async with http.stream("POST", "/v1/chat/completions", headers=bearer(), json={
                                "model": "gpt-4o-mini", "stream": True, "messages": HELLO}) as response:
                            await first.read(response)

                tg.start_soon(stream)
                await anyio.to_thread.run_sync(plan.paused.wait, 10)
                with anyio.fail_after(10):
                    await first.first_delta.wait()
                proxy.cut()
                with anyio.fail_after(10):
                    await first.ended.wait()
        assert (None, "[DONE]") not in first.events
        async with (httpx.AsyncClient(base_url=other.http, timeout=10) as http,
                    http.stream("GET", f"/v1/chat/completions/{first.generation_id}", params={"stream": "true"},
                                headers={**bearer(), "last-event-id": str(first.last_id)}) as response):
            assert response.status_code == 200
            plan.resume.set()
            await resumed.read(response)
    finally:
        plan.resume.set()
    assert resumed.events[-1] == (None, "[DONE]")
    assert min(resumed.ids()) > first.last_id
    want = expected_from(body)
    assert assemble(first).calls != want.calls
    got = assemble(first, resumed)
    assert (got.content, got.reasoning, got.calls, got.finish_reason) == (
        want.content, want.reasoning, want.calls, want.finish_reason)


async def test_a_dropped_stream_resumes_within_the_grace_here(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=100, http_resume_grace_s=10)
    request = {"model": "m", "stream": True, "messages": HELLO, "max_tokens": 60}
    first, resumed, again = Events(), Events(), Events()
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                async with http.stream("POST", "/v1/chat/completions", headers=bearer(), json=request) as response:
                    await first.read(response)

            tg.start_soon(stream)
            with anyio.fail_after(10):
                await first.first_delta.wait()
            tg.cancel_scope.cancel()  # the client goes away
        generation_id = first.generation_id
        async with http.stream("GET", f"/v1/chat/completions/{generation_id}?stream=true",
                               headers={**bearer(), "last-event-id": str(first.last_id)}) as response:
            await resumed.read(response)
        # Again from the start, once finished: from the store, role chunk included.
        async with http.stream("GET", f"/v1/chat/completions/{generation_id}",
                               params={"stream": "true", "starting_after": "-1"}, headers=bearer()) as response:
            await again.read(response)
        whole = (await http.get(f"/v1/chat/completions/{generation_id}", headers=bearer())).json()
        other_user = await http.get(f"/v1/chat/completions/{generation_id}", headers=bearer("bob"))
    assert other_user.status_code == 404 and other_user.json()["error"]["code"] == "not_found"
    assert min(resumed.ids()) > first.last_id
    text = assemble(first, resumed).content
    assert text == whole["choices"][0]["message"]["content"] == assemble(again).content
    assert len(text.split()) == 60
    assert json.loads(again.events[0][1])["choices"][0]["delta"]["role"] == "assistant"
    assert whole["usage"]["completion_tokens"] == 60
    assert server.metric('gateway_generations_total{outcome="length",transport="http"}') == 1


def test_with_no_grace_a_dropped_stream_cancels_the_upstream_at_once(serve: Serve, upstream: FakeUpstream) -> None:
    upstream.plans.append(Plan(kind="hang_mid", tokens=["a", " b", " c"], after=2))
    server = via_upstream(serve, upstream, resume_grace_s=30, http_resume_grace_s=0)
    with (httpx.Client(base_url=server.http, timeout=10) as http,
          http.stream("POST", "/v1/chat/completions", headers=bearer(),
                      json={"model": "gpt-4o-mini", "stream": True, "messages": HELLO}) as response):
        for line in response.iter_lines():
            if line.startswith("id: "):
                break
    assert upstream.last().gone.wait(1.0)


def test_with_no_grace_a_dropped_completion_cancels_the_upstream(serve: Serve, upstream: FakeUpstream) -> None:
    upstream.plans.append(Plan(kind="hang_mid", tokens=["a", " b", " c"], after=2))
    server = via_upstream(serve, upstream, http_resume_grace_s=0)
    with httpx.Client(base_url=server.http, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", headers=bearer(), json={"model": "gpt-4o-mini", "messages": HELLO})
    assert upstream.last().gone.wait(1.0)


async def test_cancel_ends_the_stream(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=50)
    events = Events()
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http, anyio.create_task_group() as tg:

        async def stream() -> None:
            async with http.stream("POST", "/v1/chat/completions", headers=bearer(), json={
                    "model": "m", "stream": True, "messages": HELLO, "max_tokens": 500}) as response:
                await events.read(response)

        tg.start_soon(stream)
        with anyio.fail_after(10):
            await events.first_delta.wait()
        assert (await http.post(f"/v1/chat/completions/{events.generation_id}/cancel",
                                headers=bearer("bob"))).status_code == 404
        cancelled = await http.post(f"/v1/chat/completions/{events.generation_id}/cancel", headers=bearer())
        assert cancelled.status_code == 200
    assert events.events[-1] == (None, "[DONE]")
    assert assemble(events).finish_reason == "cancelled"
    assert len(assemble(events).content.split()) < 500


@pytest.mark.slow
def test_a_client_that_stops_reading_is_closed_as_a_slow_consumer(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0, max_tokens=1_000_000, send_queue_size=4,
                   slow_consumer_timeout_s=0.5)
    body = json.dumps({"model": "m", "stream": True, "messages": HELLO, "max_tokens": 1_000_000}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer " + mint().encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        # The client reads nothing more: the generation is detached and, with no grace, ends.
        deadline = time.monotonic() + 10
        while server.metric('gateway_generations_total{outcome="abandoned",transport="http"}') != 1:
            assert time.monotonic() < deadline, "the stalled stream was never closed"
            time.sleep(0.05)
    finally:
        sock.close()


async def test_cancel_on_another_process_ends_the_stream(serve: Serve) -> None:
    require_redis()
    shared = {"cluster_url": TEST_REDIS_URL, "redis_prefix": unique_prefix(), "resume_grace_s": 10}
    producer = serve(backend="synthetic", synthetic_tokens_per_s=50, **shared)
    other = serve(backend="synthetic", synthetic_tokens_per_s=50, **shared)
    events = Events()
    async with httpx.AsyncClient(timeout=10) as http, anyio.create_task_group() as tg:

        async def stream() -> None:
            async with http.stream("POST", producer.http + "/v1/chat/completions", headers=bearer(), json={
                    "model": "m", "stream": True, "messages": HELLO, "max_tokens": 500}) as response:
                await events.read(response)

        tg.start_soon(stream)
        with anyio.fail_after(10):
            await events.first_delta.wait()
        cancelled = await http.post(f"{other.http}/v1/chat/completions/{events.generation_id}/cancel",
                                    headers=bearer())
        assert cancelled.status_code == 200
    assert events.events[-1] == (None, "[DONE]")
    assert assemble(events).finish_reason == "cancelled"
