"""The transformers backend's conformance subject: a tiny random model built on the fly,
one generation at a time and none waiting, so a second request is refused."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.backends import GenerationRequest, load_backend
from gateway.wire.codes import ErrorCode
from tests.conformance import Subject, request, running
from tests.support import make_settings

CAN_FAIL = True


@contextlib.asynccontextmanager
async def subject(fixtures: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    model_dir: Path = fixtures.getfixturevalue("tiny_model_dir")
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
