"""The synthetic backend's conformance subject: its deterministic tokens, 500 a second."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway.backends import load_backend
from gateway.backends.synthetic import synthetic_tokens
from tests.conformance import Subject, running
from tests.support import make_settings

CAN_FAIL = False


@contextlib.asynccontextmanager
async def subject(fixtures: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    settings = make_settings(backend="synthetic", synthetic_tokens_per_s=500)
    async with running(load_backend(settings)) as backend:
        yield Subject(backend, lambda r: "".join(synthetic_tokens(r.last_user_text(), r.max_tokens)))
