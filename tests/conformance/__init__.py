"""The subjects of the backend conformance tests (``tests/test_backend_conformance.py``):
one module per backend, named as the backend is in ``BUILTIN_BACKENDS``, plus ``plugin``.

Each module knows how to run its backend for the tests and nothing else, so adding a backend
adds a module here rather than a branch in the tests. A module exports:

- ``subject(fixtures)``: an async context manager that starts the backend (with the
  settings it needs, and whatever it talks to, such as a fake upstream) and yields a
  ``Subject``: the backend, the text it must produce for a request, the check that its own
  work stopped after the gateway closed a stream early, and the faults it can be made to
  raise. ``fixtures`` is the pytest request, for the fixtures a subject needs
  (``tiny_model_dir``, ``example_plugin``).
- ``CAN_FAIL``: whether the backend has faults to inject (echo cannot fail).

The subjects are found by name: every name in ``config.backends.BUILTIN_BACKENDS``,
``plugin`` (the example of docs/backends.md) and ``router`` (routes over deployments). A
built-in backend without a module here is a failure of the suite, not a gap in it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType

import pytest

from config.backends import BUILTIN_BACKENDS
from gateway.backends import Backend, GenerationRequest
from gateway.backends.echo import split_words
from gateway.wire.codes import ErrorCode

# The documented example plugin's subject, beside the built-in backends, and the router
# that routes configure (docs/routing.md).
PLUGIN = "plugin"
ROUTER = "router"
SUBJECTS = [*BUILTIN_BACKENDS, PLUGIN, ROUTER]
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


MakeSubject = Callable[[pytest.FixtureRequest], contextlib.AbstractAsyncContextManager[Subject]]


def subject_module(name: str) -> ModuleType:
    """The module of the subject ``name``; a missing one or one without ``subject`` and
    ``CAN_FAIL`` fails the test that asks for it."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AssertionError(f"backend {name!r} has no conformance subject: add tests/conformance/{name}.py") from None
    missing = [attr for attr in ("subject", "CAN_FAIL") if not hasattr(module, attr)]
    assert not missing, f"tests/conformance/{name}.py does not define {', '.join(missing)}"
    return module


def request(prompt: str = PROMPT, max_tokens: int = 64, stream_id: str = "s1") -> GenerationRequest:
    return GenerationRequest(id=stream_id, user="alice", max_tokens=max_tokens, prompt=prompt)


def echo_expected(req: GenerationRequest) -> str:
    """What echo sends back, and so what the fake upstream does too."""
    return "".join(split_words(req.last_user_text())[: req.max_tokens])


@contextlib.asynccontextmanager
async def running(backend: Backend) -> AsyncIterator[Backend]:
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()
