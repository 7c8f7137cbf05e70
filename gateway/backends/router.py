"""``router``: several deployments behind each model name (``GATEWAY_ROUTES`` or
``GATEWAY_ROUTES_FILE``, see ``config.routes`` and docs/routing.md), behind the one
``Backend`` interface, so nothing above the backends knows that routes exist.

Guarantees, in the terms of the backend interface:

- The client sees one stream. Before the first delta, a connect error, a 5xx, a 429 or a
  first-token timeout moves the request to a deployment of the route not tried yet (at most
  ``retries`` more, with jittered backoff), then to the ``fallbacks`` routes in order; the
  last error reaches the client only when all of them failed. Another 4xx is the request's
  fault: it reaches the client at once.
- After text has been streamed, a failure (an error, a cut, a stall) ends the stream with
  that error, unless the route says ``on_midstream_failure: "continue"``: then another
  deployment that takes ``CONTINUATION`` gets the original messages with the text so far as
  the final assistant message to continue, and ``max_tokens`` lowered by the deltas sent.
  Its deltas follow the earlier ones, so ``seq`` goes on with nothing repeated or missing.
  A continuation is not a retry: it goes, without a pause, to each deployment not tried yet
  in turn, the route's and then its fallbacks', until one finishes the answer.
  A failure inside reasoning or a tool call is not continued.
- The ``FinishChunk`` carries the route and the deployments tried (``done.route``); an
  error carries them too, in its ``route`` field.
- Each process keeps its own view of the deployments' health (``route_health``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

import anyio

from config import Settings
from config.backends import BackendLoadError, resolve_backend_factory
from config.routes import Deployment, Route, RoutesConfig
from gateway.backends.base import (
    CONTINUATION,
    Backend,
    ChatTurn,
    Chunk,
    FinishChunk,
    GenerationRequest,
    ReasoningChunk,
    TokenChunk,
    ToolCallChunk,
    refusal,
)
from gateway.backends.route_health import COOLDOWN, HEALTHY, PROBING, DeploymentState, pick
from gateway.metrics import Metrics
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import BackendError, BackendTimeout, BadRequest, GatewayError, RateLimited
from gateway.wire.events import RouteTrace

logger = logging.getLogger("gateway.backends.router")

# Longest pause between two attempts, before jitter.
BACKOFF_CAP_S = 2.0
PHASE_VALUES = {HEALTHY: 0, COOLDOWN: 1, PROBING: 2}


@dataclass(eq=False)
class _Slot:
    state: DeploymentState
    backend: Backend
    probe: bool


class _Exhausted(Exception):
    """No deployment is left to try."""


def deployment_settings(settings: Settings, deployment: Deployment) -> Settings:
    """The settings a deployment's backend is built with: the gateway's, with the
    deployment's backend, its own settings and timeouts. The router retries across
    deployments, so the backend itself does not."""
    return settings.model_copy(update={
        "backend": deployment.backend,
        "backend_settings": deployment.backend_settings,
        "routes": None,
        "routes_file": None,
        "upstream_retries": 0,
        "upstream_connect_timeout_s": deployment.connect_timeout_s or settings.upstream_connect_timeout_s,
        "upstream_first_token_timeout_s": deployment.first_token_timeout_s or settings.upstream_first_token_timeout_s,
        "upstream_idle_timeout_s": deployment.idle_timeout_s or settings.upstream_idle_timeout_s,
    })


def request_fault(exc: GatewayError) -> bool:
    """Whether an upstream's answer blames the request (a 4xx other than 429): not retried."""
    if isinstance(exc, BadRequest):
        return True
    status = exc.extra.get("upstream_status")
    return isinstance(status, int) and 400 <= status < 500 and status != 429


class RouterBackend:
    name = "router"

    def __init__(self, settings: Settings, metrics: Metrics | None = None, *,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        if settings.routes is None:
            raise BackendLoadError("the router needs routes (GATEWAY_ROUTES or GATEWAY_ROUTES_FILE)")
        self.settings = settings
        self.config: RoutesConfig = settings.routes
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.rng = rng or random.Random()
        self.states: dict[str, list[DeploymentState]] = {}
        self.backends: dict[str, Backend] = {}
        for route_name, route in self.config.routes.items():
            self.states[route_name] = [DeploymentState(d, route_name) for d in route.deployments]
            for deployment in route.deployments:
                backend = resolve_backend_factory(deployment.backend)(deployment_settings(settings, deployment))
                if not isinstance(backend, Backend):
                    raise BackendLoadError(f"backend {deployment.backend!r} does not implement the Backend interface")
                self.backends[deployment.name] = backend
        self.features: frozenset[str] = frozenset().union(
            *(getattr(b, "features", frozenset()) for b in self.backends.values()))
        self._slot_freed: anyio.Event | None = None
        # The names a client may send as model: the routes (what GET /v1/models lists).
        self.model_ids = tuple(self.config.routes)
        self.metrics.before_render.append(self.refresh_metrics)

    # Lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        for backend in self.backends.values():
            await backend.start()

    async def aclose(self) -> None:
        for backend in self.backends.values():
            try:
                await backend.aclose()
            except Exception:
                logger.exception("closing a deployment's backend failed")

    async def ready(self) -> bool:
        """Ready when every route has a deployment that is ready."""
        for states in self.states.values():
            for state in states:
                if await self.backends[state.name].ready():
                    break
            else:
                return False
        return True

    # State --------------------------------------------------------------------------------

    def refresh_metrics(self) -> None:
        now = self.clock()
        for route_name, states in self.states.items():
            for state in states:
                self.metrics.route_cooldown.labels(route_name, state.name).set(PHASE_VALUES[state.phase(now)])

    def snapshot(self) -> dict[str, Any]:
        """Every route's deployments and their health (``GET /admin/routes``): names,
        figures and states only, never a deployment's settings."""
        now = self.clock()
        return {
            "default_route": self.config.default_route,
            "routes": {
                name: {
                    "strategy": route.strategy,
                    "retries": route.retries,
                    "fallbacks": list(route.fallbacks),
                    "on_midstream_failure": route.on_midstream_failure,
                    "deployments": [state.snapshot(now) for state in self.states[name]],
                }
                for name, route in self.config.routes.items()
            },
        }

    def _route_name(self, model: str | None) -> str:
        found = self.config.route_for(model)
        if found is None:
            routes = ", ".join(self.config.routes)
            if model is None:
                raise BadRequest(f"model is required (there is no default route); routes: {routes}")
            raise BadRequest(f"model {model!r} is not a route; routes: {routes}")
        return found

    # Choosing a deployment ----------------------------------------------------------------

    async def _acquire(self, route_name: str, route: Route, tried: list[str],
                       request: GenerationRequest) -> _Slot:
        """A deployment of the route not tried yet, that takes the request, is not cooling
        down and has a free slot, waiting up to ``route_queue_timeout_s`` when all are at their
        cap. Raises ``_Exhausted`` when none is left, ``GatewayError`` too_many_streams when
        the wait ends with no slot."""
        deadline: float | None = None
        while True:
            now = self.clock()
            states = [s for s in self.states[route_name]
                      if s.name not in tried and self._takes(self.backends[s.name], request)]
            if not states:
                raise _Exhausted()
            open_ = [s for s in states if s.available(now)]
            if not open_:
                raise _Exhausted()
            free = [s for s in open_ if not s.at_cap()]
            if free:
                state = pick(route.strategy, free, self.rng)
                probe = state.begin(now)
                self.metrics.route_in_flight.labels(route_name, state.name).inc()
                return _Slot(state, self.backends[state.name], probe)
            deadline = deadline if deadline is not None else now + self.settings.route_queue_timeout_s
            remaining = deadline - now
            if remaining <= 0:
                raise GatewayError(f"every deployment of route {route_name!r} is at its max_concurrency",
                                   code=ErrorCode.TOO_MANY_STREAMS)
            if self._slot_freed is None:
                self._slot_freed = anyio.Event()
            with anyio.move_on_after(remaining):
                await self._slot_freed.wait()

    @staticmethod
    def _takes(backend: Backend, request: GenerationRequest) -> bool:
        if request.continue_final_message and CONTINUATION not in getattr(backend, "features", frozenset()):
            return False
        return refusal(backend, request) is None

    def _release(self, slot: _Slot) -> None:
        slot.state.end(slot.probe)
        self.metrics.route_in_flight.labels(slot.state.route, slot.state.name).dec()
        freed, self._slot_freed = self._slot_freed, None
        if freed is not None:
            freed.set()

    # Streaming ----------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        asked = self._route_name(request.model)
        first_route = self.config.routes[asked]
        tried: list[str] = []
        sent_text: list[str] = []  # the answer text streamed so far, for a continuation
        sent = 0  # deltas streamed so far, of every kind
        last_was_text = False
        tool_called = False
        last_error: GatewayError | None = None
        failures = 0
        if all(refusal(self.backends[d.name], request) is not None for d in first_route.deployments):
            raise BadRequest(refusal(self.backends[first_route.deployments[0].name], request) or "refused")
        for route_name in (asked, *first_route.fallbacks):
            route = self.config.routes[route_name]
            fresh = 0  # attempts of this route before anything was streamed: retries bound them
            while True:
                continuing = bool(sent)
                if not continuing:
                    if fresh > route.retries:
                        break
                    fresh += 1
                    if failures:
                        delay = min(BACKOFF_CAP_S, self.settings.upstream_retry_backoff_s * 2 ** (failures - 1))
                        await anyio.sleep(delay * self.rng.uniform(0.5, 1.0))
                attempt_request = self._continuation(request, sent_text, sent) if continuing else request
                try:
                    slot = await self._acquire(route_name, route, tried, attempt_request)
                except _Exhausted:
                    break
                state = slot.state
                tried.append(state.name)
                started = self.clock()
                first_at: float | None = None
                count = 0
                try:
                    chunks = slot.backend.stream(replace(attempt_request, model=None))
                    async with aclosing(chunks):  # type: ignore[type-var]
                        async for chunk in chunks:
                            if isinstance(chunk, FinishChunk):
                                self._succeeded(slot, started, first_at, count, "ok")
                                yield self._finish(chunk, asked, tried, sent - count)
                                return
                            if isinstance(chunk, TokenChunk | ReasoningChunk) and not chunk.text:
                                continue  # the gateway does not stream it
                            if continuing and isinstance(chunk, ReasoningChunk):
                                continue  # a continuation's own reasoning is not part of the answer
                            if first_at is None:
                                first_at = self.clock()
                                state.succeeded(first_at - started)
                                self.metrics.route_ttft.labels(route_name, state.name).observe(first_at - started)
                            count += 1
                            sent += 1
                            last_was_text = isinstance(chunk, TokenChunk)
                            if isinstance(chunk, TokenChunk):
                                sent_text.append(chunk.text)
                            elif isinstance(chunk, ToolCallChunk):
                                tool_called = True
                            yield chunk
                    self._succeeded(slot, started, first_at, count, "ok")
                    yield self._finish(FinishChunk("stop"), asked, tried, sent - count)
                    return
                except GatewayError as exc:
                    last_error = exc
                    outcome = self._failed(slot, exc, midstream=bool(sent))
                    self.metrics.route_requests.labels(route_name, state.name, outcome).inc()
                    failures += 1
                    if outcome == "rejected" and not continuing:
                        # The request's fault; but a continuation refused is the upstream's
                        # lack of continue_final_message: another deployment may take it.
                        raise self._with_route(exc, asked, tried) from None
                    continuable = last_was_text and not tool_called
                    if sent and (first_route.on_midstream_failure != "continue" or not continuable):
                        raise self._with_route(exc, asked, tried) from None
                    logger.info("stream=%s deployment %s failed (%s); trying another", request.id, state.name,
                                exc.code)
                finally:
                    self._release(slot)
        if last_error is None:
            names = ", ".join(s.name for s in self.states[asked])
            last_error = BackendError(f"no deployment of route {asked!r} is available now ({names}: cooling down, "
                                      "rate limited or unable to take the request)")
        raise self._with_route(last_error, asked, tried)

    @staticmethod
    def _continuation(request: GenerationRequest, sent_text: list[str], sent: int) -> GenerationRequest:
        """The request again, with the answer so far as the final assistant message to
        continue, for what is left of ``max_tokens``."""
        turns = request.messages or (ChatTurn("user", request.prompt or ""),)
        return replace(request, prompt=None, messages=(*turns, ChatTurn("assistant", "".join(sent_text))),
                       max_tokens=max(request.max_tokens - sent, 1), continue_final_message=True)

    def _succeeded(self, slot: _Slot, started: float, first_at: float | None, count: int, outcome: str) -> None:
        state = slot.state
        if first_at is None:
            state.succeeded(None)
        elif count > 1:
            per_token = (self.clock() - first_at) / (count - 1)
            self.metrics.route_tpot.labels(state.route, state.name).observe(per_token)
        state.count(outcome)
        self.metrics.route_requests.labels(state.route, state.name, outcome).inc()

    def _failed(self, slot: _Slot, exc: GatewayError, *, midstream: bool) -> str:
        """Records a failed attempt; its outcome label."""
        state = slot.state
        now = self.clock()
        if request_fault(exc):
            outcome = "rejected"
        elif isinstance(exc, RateLimited):
            retry_after = exc.extra.get("retry_after_s")
            state.rate_limited(now, float(retry_after) if isinstance(retry_after, int | float) else 1.0)
            outcome = "rate_limited"
        else:
            if state.failed(now, self.config.cooldown, slot.probe):
                logger.warning("route=%s deployment %s is cooling down for %g s", state.route, state.name,
                               self.config.cooldown.cooldown_s)
            outcome = "timeout" if isinstance(exc, BackendTimeout) else "error"
            if midstream:
                outcome = "midstream_" + outcome
        state.count(outcome)
        return outcome

    @staticmethod
    def _finish(chunk: FinishChunk, asked: str, tried: list[str], earlier: int) -> FinishChunk:
        """The attempt's finish with the route; a continuation's counts include the deltas
        sent before it."""
        completion = chunk.completion_tokens
        if earlier and completion is not None:
            completion += earlier
        return replace(chunk, completion_tokens=completion, route=RouteTrace(asked, tuple(tried)))

    @staticmethod
    def _with_route(exc: GatewayError, asked: str, tried: list[str]) -> GatewayError:
        exc.extra["route"] = {"name": asked, "deployments": list(tried)}
        return exc
