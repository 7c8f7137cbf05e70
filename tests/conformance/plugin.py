"""The conformance subject of the example plugin in docs/backends.md, installed as a
distribution and loaded by its entry-point name, with its own setting."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway.backends import GenerationRequest, load_backend
from tests.conformance import Subject, running
from tests.support import make_settings

CAN_FAIL = False


def shout_expected(req: GenerationRequest) -> str:
    return "".join(word.upper() + " " for word in req.last_user_text().split()[: req.max_tokens])


@contextlib.asynccontextmanager
async def subject(fixtures: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    plugin_name = fixtures.getfixturevalue("example_plugin")
    async with running(load_backend(make_settings(backend=plugin_name, shout_delay_ms=2))) as backend:
        yield Subject(backend, shout_expected)
