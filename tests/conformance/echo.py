"""The echo backend's conformance subject: the prompt back, word by word, 2 ms apart."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway.backends import load_backend
from tests.conformance import Subject, echo_expected, running
from tests.support import make_settings

CAN_FAIL = False


@contextlib.asynccontextmanager
async def subject(fixtures: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    async with running(load_backend(make_settings(backend="echo", echo_delay_ms=2))) as backend:
        yield Subject(backend, echo_expected)
