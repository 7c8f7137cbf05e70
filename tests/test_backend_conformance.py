"""One set of tests for every backend: the guarantees of ``gateway.backends.base``.

Each backend is driven through the interface alone (``start``, ``stream``, ``aclose`` on the
iterator), the way the gateway drives it. The backends under test come from the registry:
every built-in name, and the example plugin from docs/backends.md loaded by its entry-point
name. How each is set up (its settings, the text it must produce, the faults it can be made
to raise) is its own module in ``tests/conformance/``; see the docstring there.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator

import anyio
import pytest

from config.backends import BUILTIN_BACKENDS
from gateway.backends import Backend, FinishChunk, GenerationRequest, TokenChunk
from gateway.wire.errors import GatewayError
from tests.conformance import PLUGIN, SUBJECTS, Subject, request, subject_module

pytestmark = pytest.mark.anyio


def test_every_builtin_backend_has_a_subject() -> None:
    missing = [name for name in BUILTIN_BACKENDS if importlib.util.find_spec(f"tests.conformance.{name}") is None]
    assert not missing, f"built-in backends without a conformance subject in tests/conformance/: {missing}"
    assert set(BUILTIN_BACKENDS) <= set(SUBJECTS)
    with pytest.raises(AssertionError, match="has no conformance subject"):
        subject_module("a-backend-nobody-wrote-a-subject-for")


@contextlib.asynccontextmanager
async def made(name: str, request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    async with subject_module(name).subject(request) as subject:
        assert isinstance(subject, Subject)
        if name != PLUGIN:
            assert subject.backend.name == name, f"tests/conformance/{name}.py runs another backend"
        yield subject


@pytest.fixture(params=SUBJECTS)
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    async with made(request.param, request) as subject:
        yield subject


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


# echo, synthetic and the example plugin cannot fail: they have no faults to inject.
@pytest.fixture(params=[name for name in SUBJECTS if subject_module(name).CAN_FAIL])
async def faulty_subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    async with made(request.param, request) as subject:
        assert subject.faults or subject.busy is not None
        yield subject


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
