"""The gateway's uvicorn integration: the parts plain uvicorn lacks.

- ``GatewayWebSocketProtocol`` (uvicorn's websockets-sansio implementation) bounds what a
  client that stops reading can cost: a deliberate kernel send buffer (``SO_SNDBUF``),
  ``TCP_USER_TIMEOUT`` so the kernel gives up on a peer that acknowledges nothing, and a
  close that does not wait for the send buffer to drain (uvicorn's own close waits until
  the transport is writable, which never happens behind a client that stopped reading).
  It also records when the client last sent anything, protocol pongs included, which is
  the connection's sign of life.
- ``GatewayServer`` owns the shutdown sequence: on SIGTERM uvicorn would send 1012 to
  every WebSocket at once; the gateway drains first (see ``Hub.drain``) and only then lets
  uvicorn close what is left.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from config import Settings
from gateway.core.ports import TRANSPORT_EXTENSION, Drains
from gateway.logs import logging_config

logger = logging.getLogger("gateway.server")

# After a forced close, how long a peer gets to take the close frame before the socket
# is aborted.
ABORT_GRACE_S = 1.0


class TransportControl:
    """What a connection handler may do to its socket beyond ASGI (the ``Transport``
    port), exposed as the ``gateway.transport`` scope extension."""

    def __init__(self, protocol: GatewayWebSocketProtocol) -> None:
        self._protocol = protocol

    @property
    def last_inbound(self) -> float:
        """Event-loop time of the last bytes received from the client."""
        return self._protocol.last_inbound

    @property
    def write_backlog(self) -> int:
        transport = self._protocol.transport
        return transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0

    def send_texts(self, texts: list[str]) -> bool:
        """Write text frames now, in one ``write``, if the socket takes data without waiting.
        False, with nothing written, when it is paused above its high-water mark, closing or
        gone: the caller then sends through ASGI, which waits or reports the disconnect.

        This is the writer's path per frame: it skips the ASGI message dict, starlette's
        state checks and uvicorn's ``writable.wait()``, which cost more than the frame."""
        protocol = self._protocol
        transport = protocol.transport
        conn = protocol.conn
        if (protocol.close_sent or protocol.disconnected or conn.state is not State.OPEN
                or not protocol.writable.is_set() or transport is None or transport.is_closing()):
            return False
        for text in texts:
            conn.send_text(text.encode())
        transport.write(b"".join(conn.data_to_send()))
        return True

    def force_close(self, code: int, reason: str = "") -> None:
        """Queue a close frame without waiting for the send buffer, then close the socket;
        abort it if the peer has not taken the buffered bytes within ``ABORT_GRACE_S``."""
        self._protocol.force_close(code, reason)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, letting go of its parser once a WebSocket upgrade has
    handed the socket over. The parser holds the protocol's callbacks, and uvicorn breaks
    that reference cycle only in ``connection_lost``, which after an upgrade goes to the
    WebSocket protocol instead: left alone, every WebSocket would leave this object (and
    the socket it references) to the next full collection, which the gateway runs once a
    minute, so a burst of connections would raise the process's memory for that long."""

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        self.parser = None  # type: ignore[assignment]


class GatewayConfig(uvicorn.Config):
    """uvicorn's config plus the gateway's socket options (it is pickled to workers)."""

    def __init__(self, app: Any, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.gateway_send_buffer_bytes = settings.socket_send_buffer_bytes
        self.gateway_tcp_user_timeout_ms = int(settings.tcp_user_timeout_s * 1000)


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    write_high_water: int = 64 * 1024

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.send_buffer_bytes: int = getattr(config, "gateway_send_buffer_bytes", 0)
        self.tcp_user_timeout_ms: int = getattr(config, "gateway_tcp_user_timeout_ms", 0)
        self.last_inbound = self.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                if self.send_buffer_bytes:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
                if self.tcp_user_timeout_ms and hasattr(socket, "TCP_USER_TIMEOUT"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.tcp_user_timeout_ms)
            except OSError:  # pragma: no cover - best effort on unusual platforms
                logger.debug("could not set socket options", exc_info=True)
        if isinstance(transport, asyncio.WriteTransport):
            transport.set_write_buffer_limits(high=self.write_high_water)

    def data_received(self, data: bytes) -> None:
        self.last_inbound = self.loop.time()
        super().data_received(data)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The ASGI task was created but has not run yet, so the scope can still be extended.
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][TRANSPORT_EXTENSION] = TransportControl(self)

    def force_close(self, code: int, reason: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.close_sent:
            try:
                self.conn.send_close(code, reason)
                transport.write(b"".join(self.conn.data_to_send()))
            except Exception:  # the protocol may already be closing
                pass
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        # Unblock an ASGI send() waiting for the buffer to drain; it will see close_sent.
        self.writable.set()
        transport.close()
        self.loop.call_later(ABORT_GRACE_S, transport.abort)


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the gateway's drain in front of uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, hub: Drains | None = None) -> None:
        super().__init__(config)
        self.hub = hub

    def _find_hub(self) -> Drains | None:
        if self.hub is not None:
            return self.hub
        # In a worker the app was built by the factory: find it under uvicorn's middleware.
        app = self.config.loaded_app
        for _ in range(10):
            state = getattr(app, "state", None)
            hub: Drains | None = getattr(state, "hub", None) if state is not None else None
            if hub is not None:
                return hub
            app = getattr(app, "app", None)
        return None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Keep listening while draining, so /readyz can report 503 to the load balancer.
        try:
            hub = self._find_hub()
            if hub is not None:
                await hub.drain(force_exit=lambda: self.force_exit)
        except Exception:
            logger.exception("drain failed; closing connections now")
        await super().shutdown(sockets)
        # uvicorn re-raises a captured SIGTERM after shutting down, so the process would die
        # of the signal; a completed drain is a clean exit.
        self._captured_signals.clear()


def uvicorn_config(
    app: Any, settings: Settings, *, host: str | None = None, port: int | None = None, **overrides: Any
) -> GatewayConfig:
    options: dict[str, Any] = {
        "host": host if host is not None else settings.host,
        "port": port if port is not None else settings.port,
        "http": GatewayHttpProtocol,
        "ws": GatewayWebSocketProtocol,
        "ws_max_size": settings.max_message_bytes,
        "ws_ping_interval": settings.ws_ping_interval_s or None,
        "ws_ping_timeout": settings.ws_ping_timeout_s or None,
        # Compression costs CPU on every frame and the size limit would apply only after
        # inflating; token frames are small. Off.
        "ws_per_message_deflate": False,
        "log_config": logging_config(settings.log_level, access_log=settings.access_log),
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": 5,
        "lifespan": "on",
    }
    options.update(overrides)
    return GatewayConfig(app, settings=settings, **options)


def listening_socket(config: uvicorn.Config) -> socket.socket:
    """Bind and listen before announcing the address, so connections made while the
    workers start wait in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(config.backlog)
    sock.set_inheritable(True)
    address = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", address, sock.getsockname()[1])
    return sock
