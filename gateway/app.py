"""``create_app(settings)``: builds the running gateway, one typed object graph (the
authenticator, the backend, the metrics, the cluster parts and the hub that holds them),
and the FastAPI application that serves it. Nothing here reads the environment."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from config import Settings
from gateway.auth import Authenticator, build_authenticator
from gateway.backends import load_backend
from gateway.cluster import build_cluster
from gateway.endpoints import admin_broadcast, admin_routes, websocket_endpoint
from gateway.http import install as install_http_api
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.runtime import CollectionPolicy, GCPauses, LoopLagProbe
from gateway.wire.errors import Unavailable

logger = logging.getLogger("gateway.app")


def _log_startup(settings: Settings, auth: Authenticator) -> None:
    if not auth.enabled:
        logger.warning("GATEWAY_AUTH=none: authentication is OFF; every client is 'anonymous'")
        return
    if auth.generated_dev_secret:
        token = auth.mint("dev", ttl_s=24 * 3600)
        url = f"ws://{settings.host}:{settings.port}/ws"
        logger.warning(
            "no JWT key configured (GATEWAY_ENV=dev): generated a random secret for this run.\n"
            "  development token (user 'dev', 24 h): %s\n"
            '  try: wscat -c %s -H "Authorization: Bearer %s"',
            token,
            url,
            token,
            extra={"dev_token": True},
        )


def create_app(settings: Settings) -> FastAPI:
    authenticator = build_authenticator(settings)
    metrics = Metrics()
    backend = load_backend(settings, metrics)
    cluster = build_cluster(settings)
    hub = Hub(settings, backend, authenticator, metrics, cluster)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The hub's task group owns every generation and background loop of this process.
        async with anyio.create_task_group() as task_group:
            try:
                await hub.start(task_group)
            except Unavailable as exc:
                logger.error("%s", exc)
                raise
            await backend.start()
            _log_startup(settings, authenticator)
            logger.info("gateway ready: backend=%s cluster=%s node=%s", backend.name, cluster.name, cluster.node_id)
            loop_lag = LoopLagProbe(metrics)
            gc_pauses = GCPauses(metrics)
            collections = CollectionPolicy(settings.gc_freeze_after_start, settings.gc_full_collection_interval_s,
                                           settings.gc_trim_after_collection)
            loop_lag.start()
            gc_pauses.start()
            collections.start()
            try:
                yield
            finally:
                collections.stop()
                loop_lag.stop()
                gc_pauses.stop()
                task_group.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await backend.aclose()
                    await hub.aclose()

    app = FastAPI(title="token gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.state.settings = settings
    app.add_api_websocket_route("/ws", websocket_endpoint)
    install_http_api(app, hub)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if hub.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not hub.cluster_up:
            # Still serving: streams whose client and producer share this process keep
            # flowing; cross-process features wait for the cluster store. Taking every
            # process out of rotation because it is down would make things worse.
            return JSONResponse({"status": "degraded", "cluster": "down"})
        try:
            ready = await backend.ready()
        except Exception:
            logger.exception("backend readiness check failed")
            ready = False
        if not ready:
            return JSONResponse({"status": "backend not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.post("/admin/broadcast")
    async def admin_broadcast_endpoint(request: Request) -> Response:
        return await admin_broadcast(hub, request)

    @app.get("/admin/routes")
    async def admin_routes_endpoint(request: Request) -> Response:
        return await admin_routes(hub, request)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.tasks.set(len(asyncio.all_tasks()))
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    static = resources.files("gateway").joinpath("client", "static")  # package data of gateway.client
    page = static.joinpath("index.html").read_text(encoding="utf-8")
    client_js = static.joinpath("client.js").read_text(encoding="utf-8")

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/client.js")
    async def client_module() -> Response:
        # Module scripts are fetched with CORS: a page on another origin may import the SDK.
        return Response(client_js, media_type="text/javascript; charset=utf-8",
                        headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-cache"})

    return app
