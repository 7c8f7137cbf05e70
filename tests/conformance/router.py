"""The router's conformance subject: a route of two openai deployments on the local fake
upstream, with no retries, so that an injected fault reaches the client as one upstream's
would (and the next request goes to whichever deployment is not skipped)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from gateway.backends import GenerationRequest, load_backend
from gateway.wire.codes import ErrorCode
from tests.conformance import Fault, Subject, echo_expected, running
from tests.fake_upstream import FakeUpstream, Plan
from tests.support import make_settings

CAN_FAIL = True


@contextlib.asynccontextmanager
async def subject(fixtures: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    with FakeUpstream() as upstream:
        upstream.default = Plan(delay_s=0.005)
        deployments = [{"name": name, "backend": "openai", "base_url": upstream.base_url} for name in ("a", "b")]
        routes = {"cooldown": {"allowed_fails": 100}, "routes": {"r": {"retries": 0, "deployments": deployments}}}
        settings = make_settings(routes=routes, upstream_first_token_timeout_s=0.5, upstream_retry_backoff_s=0.01)

        async def upstream_saw_disconnect(req: GenerationRequest) -> None:
            seen = upstream.last()
            assert await anyio.to_thread.run_sync(seen.gone.wait, 1.0), "the upstream response stayed open"
            assert not seen.completed

        def plan(p: Plan) -> Callable[[], None]:
            return lambda: upstream.plans.append(p)

        faults = [
            Fault(plan(Plan(kind="status", status=500)), ErrorCode.BACKEND_ERROR),
            Fault(plan(Plan(kind="status", status=429, headers={"retry-after": "0.2"})), ErrorCode.RATE_LIMITED),
            Fault(plan(Plan(kind="hang_before")), ErrorCode.BACKEND_TIMEOUT),
            Fault(plan(Plan(kind="malformed", after=0)), ErrorCode.BACKEND_ERROR),
        ]
        async with running(load_backend(settings)) as backend:
            yield Subject(backend, echo_expected, upstream_saw_disconnect, faults)
