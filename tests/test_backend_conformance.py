"""One set of tests for every backend: the guarantees of ``gateway.backends.base``.

Each backend is driven through the interface alone (``start``, ``stream``, ``aclose`` on the
iterator), the way the gateway drives it: echo, synthetic, openai against the local fake
upstream, transformers with a tiny model built on the fly, and the example plugin from
docs/backends.md loaded by its entry-point name.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.backends import Backend, FinishChunk, GenerationRequest, TokenChunk, load_backend
from gateway.backends.echo import split_words
from gateway.backends.synthetic import synthetic_tokens
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import GatewayError
from tests.fake_upstream import FakeUpstream, Plan
from tests.support import make_settings

pytestmark = pytest.mark.anyio

BACKENDS = ["echo", "synthetic", "openai", "transformers", "plugin"]
# echo, synthetic and the example plugin cannot fail: they have no faults to inject.
BACKENDS_WITH_FAULTS = ["openai", "transformers"]
PROMPT = "tokens arrive in order and stop when asked to stop"


@dataclass
class Fault:
    """Makes the backend fail the next stream; the error code the client must get."""

    prepare: Callable[[], None]
    code: ErrorCode


@dataclass
class Subject:
    backend: Backend
    expected: Callable[[GenerationRequest], str]
    # Called after the gateway closed a stream early: checks the backend's own work stopped.
    stopped: Callable[[GenerationRequest], Awaitable[None]] | None = None
    faults: list[Fault] = field(default_factory=list)
    # A fault that needs concurrency: a request that holds the backend busy, and the code
    # another request then gets.
    busy: tuple[GenerationRequest, ErrorCode] | None = None


def request(prompt: str = PROMPT, max_tokens: int = 64, stream_id: str = "s1") -> GenerationRequest:
    return GenerationRequest(id=stream_id, user="alice", max_tokens=max_tokens, prompt=prompt)


def echo_expected(req: GenerationRequest) -> str:
    return "".join(split_words(req.last_user_text())[: req.max_tokens])


@contextlib.asynccontextmanager
async def running(backend: Backend) -> AsyncIterator[Backend]:
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


@contextlib.asynccontextmanager
async def make_subject(name: str, request_fixture: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if name == "echo":
        async with running(load_backend(make_settings(backend="echo", echo_delay_ms=2))) as backend:
            yield Subject(backend, echo_expected)
    elif name == "synthetic":
        settings = make_settings(backend="synthetic", synthetic_tokens_per_s=500)
        async with running(load_backend(settings)) as backend:
            yield Subject(backend, lambda r: "".join(synthetic_tokens(r.last_user_text(), r.max_tokens)))
    elif name == "openai":
        with FakeUpstream() as upstream:
            upstream.default = Plan(delay_s=0.005)
            settings = make_settings(backend="openai", openai_base_url=upstream.base_url,
                                     upstream_first_token_timeout_s=0.5, upstream_retry_backoff_s=0.01)

            async def upstream_saw_disconnect(req: GenerationRequest) -> None:
                seen = upstream.last()
                assert await anyio.to_thread.run_sync(seen.gone.wait, 1.0), "the upstream response stayed open"
                assert not seen.completed

            def plan(p: Plan) -> Callable[[], None]:
                return lambda: upstream.plans.append(p)

            faults = [
                Fault(plan(Plan(kind="status", status=500)), ErrorCode.BACKEND_ERROR),
                Fault(plan(Plan(kind="status", status=429, headers={"retry-after": "1"})), ErrorCode.RATE_LIMITED),
                Fault(plan(Plan(kind="hang_before")), ErrorCode.BACKEND_TIMEOUT),
                Fault(plan(Plan(kind="malformed", after=0)), ErrorCode.BACKEND_ERROR),
            ]
            async with running(load_backend(settings)) as backend:
                yield Subject(backend, echo_expected, upstream_saw_disconnect, faults)
    elif name == "transformers":
        model_dir: Path = request_fixture.getfixturevalue("tiny_model_dir")
        settings = make_settings(backend="transformers", local_model=str(model_dir), local_max_concurrency=1,
                                 local_queue_size=0)
        async with running(load_backend(settings)) as backend:
            reference = _greedy_reference(backend)

            async def thread_ended(req: GenerationRequest) -> None:
                # aclose() returned after the thread's last step; it has only to return now.
                for thread in [t for t in threading.enumerate() if t.name == f"generate {req.id}"]:
                    await anyio.to_thread.run_sync(thread.join, 1.0)
                    assert not thread.is_alive(), "the generation thread is still running"

            yield Subject(backend, reference, thread_ended,
                          busy=(request(max_tokens=400, stream_id="holder"), ErrorCode.TOO_MANY_STREAMS))
    elif name == "plugin":
        plugin_name = request_fixture.getfixturevalue("example_plugin")
        async with running(load_backend(make_settings(backend=plugin_name))) as backend:
            yield Subject(backend, shout_expected)
    else:
        raise AssertionError(name)


def shout_expected(req: GenerationRequest) -> str:
    return "".join(word.upper() + " " for word in req.last_user_text().split()[: req.max_tokens])


def _greedy_reference(backend: Any) -> Callable[[GenerationRequest], str]:
    """What the model generates for a request, computed without the backend's streaming."""
    import torch

    loaded = backend._loaded

    def expected(req: GenerationRequest) -> str:
        inputs = backend.encode(req)
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, max_new_tokens=req.max_tokens, do_sample=False)
        return str(loaded.tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))

    return expected


@pytest.fixture(params=BACKENDS)
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    async with make_subject(request.param, request) as made:
        yield made


async def collect(backend: Backend, req: GenerationRequest) -> tuple[list[str], list[FinishChunk]]:
    texts: list[str] = []
    finishes: list[FinishChunk] = []
    with anyio.fail_after(30):
        async for chunk in backend.stream(req):
            assert not finishes, "nothing may follow the FinishChunk"
            if isinstance(chunk, TokenChunk):
                texts.append(chunk.text)
            else:
                assert isinstance(chunk, FinishChunk)
                finishes.append(chunk)
    return texts, finishes


async def test_tokens_in_order(subject: Subject) -> None:
    assert await subject.backend.ready()
    req = request(max_tokens=48)
    texts, finishes = await collect(subject.backend, req)
    assert len([t for t in texts if t]) > 1
    assert "".join(texts) == subject.expected(req)
    assert len(finishes) <= 1


async def test_max_tokens_is_honoured(subject: Subject) -> None:
    req = request(max_tokens=3)
    texts, finishes = await collect(subject.backend, req)
    assert 1 <= len([t for t in texts if t]) <= 3
    assert "".join(texts) == subject.expected(req)
    assert [f.finish_reason for f in finishes] in ([], ["length"])


async def test_aclose_stops_the_stream_promptly(subject: Subject) -> None:
    req = request(" ".join(["word"] * 600), max_tokens=600)
    iterator = subject.backend.stream(req)
    with anyio.fail_after(10):
        first = await anext(iterator)
        second = await anext(iterator)
    assert isinstance(first, TokenChunk) and isinstance(second, TokenChunk)
    with anyio.fail_after(1.0):
        await iterator.aclose()  # type: ignore[attr-defined]
    if subject.stopped is not None:
        await subject.stopped(req)
    # The backend serves the next request as before.
    texts, _ = await collect(subject.backend, request(max_tokens=2, stream_id="after"))
    assert "".join(texts) == subject.expected(request(max_tokens=2, stream_id="after"))


@pytest.fixture(params=BACKENDS_WITH_FAULTS)
async def faulty_subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    async with make_subject(request.param, request) as made:
        assert made.faults or made.busy is not None
        yield made


async def test_faults_map_to_error_codes(faulty_subject: Subject) -> None:
    subject = faulty_subject
    for fault in subject.faults:
        fault.prepare()
        with pytest.raises(GatewayError) as caught:
            await collect(subject.backend, request())
        assert caught.value.code is fault.code
    if subject.busy is not None:
        holder_request, code = subject.busy
        holder = subject.backend.stream(holder_request)
        with anyio.fail_after(10):
            await anext(holder)
        try:
            with pytest.raises(GatewayError) as caught:
                await collect(subject.backend, request(stream_id="refused"))
            assert caught.value.code is code
        finally:
            await holder.aclose()  # type: ignore[attr-defined]
