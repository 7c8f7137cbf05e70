"""The gateway with another uvicorn WebSocket implementation, event loop or HTTP parser,
for the hot-path study: ``python -m benchmarks.gateway_variant --port P --ws … --loop … --http …``.

Settings come from ``GATEWAY_*`` as for ``gateway serve``; the app, config and server are
the gateway's own (``create_app``, ``uvicorn_config``, ``GatewayServer``). ``--ws gateway``
keeps the gateway's ``GatewayWebSocketProtocol``; any other value is uvicorn's plain
implementation of that name, which loses what the gateway adds to it (``SO_SNDBUF``,
``TCP_USER_TIMEOUT``, the forced close that does not wait for a client that stopped
reading, protocol pongs counting as a sign of life): the connection falls back to
``websocket.close()`` and application pongs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from config import Settings
from gateway.app import create_app
from gateway.transport.uvicorn import GatewayServer, uvicorn_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_variant")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ws", default="gateway", help="gateway, websockets-sansio, websockets or wsproto")
    parser.add_argument("--loop", default="auto", help="auto (uvloop when installed), uvloop or asyncio")
    parser.add_argument("--http", default="auto", help="auto (httptools when installed), httptools or h11")
    args = parser.parse_args(argv)
    settings = Settings()
    app = create_app(settings)
    overrides: dict[str, Any] = {"loop": args.loop, "http": args.http}
    if args.ws != "gateway":
        overrides["ws"] = args.ws
    server = GatewayServer(uvicorn_config(app, settings, host="127.0.0.1", port=args.port, **overrides), app.state.hub)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
