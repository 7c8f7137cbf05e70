"""The endpoints: the WebSocket handshake (origin, credentials, limits, first-message
authentication) that turns a socket into a ``Connection``, and the admin broadcast."""

from __future__ import annotations

import logging
import secrets

import anyio
from fastapi import Request, WebSocket
from fastapi.responses import JSONResponse, Response

from gateway.auth import Principal, extract_credentials, origin_allowed
from gateway.cluster.control import Broadcast
from gateway.connection import Connection
from gateway.hub import Hub
from gateway.wire.codes import CloseCode
from gateway.wire.errors import AuthError, FrameError
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

    if principal is None and hub.pending_auth >= settings.max_pending_auth:
        # Sockets that have not authenticated yet have a cap of their own, so strangers
        # holding sockets open cannot use up GATEWAY_MAX_CONNECTIONS and lock users out.
        metrics.closes.labels("pending_auth_full").inc()
        await _deny(websocket, 503, "unavailable", "too many connections waiting to authenticate; try again")
        return
    await websocket.accept(subprotocol=credentials.subprotocol)
    hub.socket_opened()
    pending = principal is None
    if pending:
        hub.pending_auth += 1
    try:
        if hub.draining:
            await _close(websocket, CloseCode.GOING_AWAY, "server shutting down")
            return
        if principal is None:
            principal = await _first_message_auth(hub, websocket)
            hub.pending_auth -= 1
            pending = False
            if principal is None:
                return
            if hub.is_draining():  # the drain began while this client was authenticating
                await _close(websocket, CloseCode.GOING_AWAY, "server shutting down")
                return
        if hub.open_sockets - hub.pending_auth > settings.max_connections:
            metrics.closes.labels("server_full").inc()
            await _close(websocket, CloseCode.TRY_AGAIN_LATER, "server full")
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
        if pending:
            hub.pending_auth -= 1
        hub.socket_closed()


async def _admin_denied(hub: Hub, request: Request) -> Response | None:
    """None when the request carries a bearer JWT with the admin role, else the answer."""
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
    return None


async def admin_routes(hub: Hub, request: Request) -> Response:
    """GET /admin/routes: each route's deployments and their health (names and figures,
    never a deployment's settings); a bearer JWT with the admin role."""
    denied = await _admin_denied(hub, request)
    if denied is not None:
        return denied
    snapshot = getattr(hub.backend, "snapshot", None)
    if snapshot is None:
        return JSONResponse({"routes": None, "backend": hub.backend.name})
    return JSONResponse(snapshot())


async def admin_broadcast(hub: Hub, request: Request) -> Response:
    """POST /admin/broadcast {"data": …, "user": optional}: a bearer JWT with the admin role."""
    denied = await _admin_denied(hub, request)
    if denied is not None:
        return denied
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
        await hub.publish(Broadcast(body["data"], user))
    except Exception:
        return JSONResponse({"error": "unavailable", "reason": "the cluster is unreachable"}, status_code=503)
    return JSONResponse({"status": "sent"}, status_code=202)
