"""``create_app(settings)``: the FastAPI application with the WebSocket endpoint and the
operational endpoints. Nothing here reads the environment."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

import anyio
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from config import Settings
from gateway.auth import Authenticator, Principal, extract_credentials, origin_allowed
from gateway.backends import load_backend
from gateway.cluster import build_cluster
from gateway.connection import Connection
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.wire.codes import CloseCode
from gateway.wire.errors import AuthError, FrameError, Unavailable
from gateway.wire.inbound import AuthMessage, parse_client_frame

logger = logging.getLogger("gateway.app")


def _new_session_id() -> str:
    return "c-" + secrets.token_hex(6)


async def _deny(websocket: WebSocket, status: int, error: str, reason: str) -> None:
    """Refuse the handshake with an HTTP response: no upgrade happens."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"error": error, "reason": reason}, status_code=status))
    else:
        await websocket.close(CloseCode.POLICY, reason)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    try:
        with anyio.move_on_after(2.0):
            await websocket.close(code, reason)
    except (OSError, RuntimeError):
        pass


async def _first_message_auth(hub: Hub, websocket: WebSocket) -> Principal | None:
    """Wait for ``{"type":"auth","token":…}``; close 1008 on anything else."""
    message = None
    with anyio.move_on_after(hub.settings.auth_timeout_s):
        message = await websocket.receive()
    if message is None:
        hub.metrics.auth_failures.labels("timeout").inc()
        await _close(websocket, CloseCode.POLICY, "authentication timeout")
        return None
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    try:
        parsed = parse_client_frame(text) if text is not None else None
    except FrameError:
        parsed = None
    if not isinstance(parsed, AuthMessage):
        hub.metrics.auth_failures.labels("no_credentials").inc()
        await _close(websocket, CloseCode.POLICY, 'authentication required: send {"type":"auth","token":…}')
        return None
    try:
        return await hub.auth.verify(parsed.token)
    except AuthError as exc:
        hub.metrics.auth_failures.labels(exc.reason).inc()
        logger.info("authentication failed (first message): %s", exc.reason)
        await _close(websocket, CloseCode.POLICY, f"authentication failed: {exc.message}")
        return None


async def websocket_endpoint(websocket: WebSocket) -> None:
    hub: Hub = websocket.app.state.hub
    settings = hub.settings
    metrics = hub.metrics
    if not origin_allowed(websocket.headers.get("origin"), settings.allowed_origins):
        metrics.auth_failures.labels("origin").inc()
        logger.info("handshake refused: origin not allowed")
        await _deny(websocket, 403, "forbidden", "origin not allowed")
        return
    credentials = extract_credentials(
        websocket.headers, websocket.scope.get("subprotocols", []), websocket.scope.get("query_string", b"")
    )
    principal: Principal | None = None
    if not hub.auth.enabled:
        principal = Principal(user="anonymous", expires_at=None)
    elif credentials.token is not None:
        try:
            principal = await hub.auth.verify(credentials.token)
        except AuthError as exc:
            metrics.auth_failures.labels(exc.reason).inc()
            logger.info("handshake refused (%s credentials): %s", credentials.source, exc.reason)
            await _deny(websocket, 403, "unauthorized", exc.message)
            return

    await websocket.accept(subprotocol=credentials.subprotocol)
    hub.socket_opened()
    try:
        if hub.draining:
            await _close(websocket, CloseCode.GOING_AWAY, "server shutting down")
            return
        if hub.open_sockets > settings.max_connections:
            metrics.closes.labels("server_full").inc()
            await _close(websocket, CloseCode.TRY_AGAIN_LATER, "server full")
            return
        if principal is None:
            principal = await _first_message_auth(hub, websocket)
            if principal is None:
                return
            if hub.is_draining():  # the drain began while this client was authenticating
                await _close(websocket, CloseCode.GOING_AWAY, "server shutting down")
                return
        lease = await hub.limits.add_connection(principal.user)
        if lease is None:
            metrics.closes.labels("user_connections").inc()
            await _close(websocket, CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
            return
        connection = Connection(hub, websocket, principal, _new_session_id())
        # The connection took what it needs; the token and the claims are not kept
        # alive by this frame for as long as the connection is open.
        del principal, credentials
        hub.connections.add(connection)
        try:
            await connection.serve()
        finally:
            hub.connections.discard(connection)
            with anyio.CancelScope(shield=True):
                await lease.release()
    finally:
        hub.socket_closed()


async def _admin_broadcast(hub: Hub, request: Request) -> Response:
    """POST /admin/broadcast {"data": …, "user": optional}: a bearer JWT with the admin role."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return JSONResponse({"error": "unauthorized", "reason": "a bearer token is required"}, status_code=401)
    try:
        principal = await hub.auth.verify(token.strip())
    except AuthError as exc:
        hub.metrics.auth_failures.labels(exc.reason).inc()
        return JSONResponse({"error": "unauthorized", "reason": exc.message}, status_code=401)
    roles = principal.claims.get(hub.settings.roles_claim)
    if not hub.auth.enabled or not isinstance(roles, list) or hub.settings.admin_role not in roles:
        return JSONResponse({"error": "forbidden", "reason": "the admin role is required"}, status_code=403)
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "data" not in body:
        return JSONResponse({"error": "bad_request", "reason": 'body must be {"data": …, "user": optional}'},
                            status_code=400)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        return JSONResponse({"error": "bad_request", "reason": "user must be a string"}, status_code=400)
    try:
        await hub.publish({"op": "broadcast", "data": body["data"], "user": user})
    except Exception:
        return JSONResponse({"error": "unavailable", "reason": "the cluster is unreachable"}, status_code=503)
    return JSONResponse({"status": "sent"}, status_code=202)


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
    authenticator = Authenticator(settings)
    backend = load_backend(settings)
    metrics = Metrics()
    parts = build_cluster(settings)
    hub = Hub(settings, backend, authenticator, metrics, parts.store, parts.backplane, parts.limits, parts.redis)

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
            logger.info("gateway ready: backend=%s cluster=%s node=%s", backend.name, hub.store.name, hub.node_id)
            try:
                yield
            finally:
                task_group.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await backend.aclose()
                    await hub.aclose()

    app = FastAPI(title="token gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.state.settings = settings
    app.add_api_websocket_route("/ws", websocket_endpoint)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if hub.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not hub.redis_up:
            # Still serving: streams whose client and producer share this process keep
            # flowing; cross-process features wait for Redis. Taking every process out of
            # rotation because Redis is down would make things worse.
            return JSONResponse({"status": "degraded", "redis": "down"})
        try:
            ready = await backend.ready()
        except Exception:
            logger.exception("backend readiness check failed")
            ready = False
        if not ready:
            return JSONResponse({"status": "backend not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.post("/admin/broadcast")
    async def admin_broadcast(request: Request) -> Response:
        return await _admin_broadcast(hub, request)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
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
