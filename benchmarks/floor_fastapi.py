"""The floor: a bare FastAPI/uvicorn WebSocket endpoint doing the least the gateway does.

It accepts without authentication, sends a hello, and for each ``generate`` sends a start
frame, the same JSON token frames as the gateway (one frame per token, ``send_text`` in a
loop, paced like the synthetic backend when asked) and a done frame. No queue, no
coalescing, no limits, no heartbeats beyond uvicorn's protocol pings: whatever the gateway
costs beyond this is the gateway's own.

``python -m benchmarks.floor_fastapi --port P [--tokens-per-s R --ttft-ms T --ws … --loop … --http …]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from benchmarks.floor_common import HELLO, Pacing, freeze_after_start, schedule_tokens


def create_app(pacing: Pacing) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    async def stream(websocket: WebSocket, request: dict[str, object]) -> None:
        stream_id = str(request.get("id", "r"))
        tokens = schedule_tokens(request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await websocket.send_text(orjson.dumps({"type": "start", "id": stream_id}).decode())
        interval = 1.0 / pacing.tokens_per_s if pacing.tokens_per_s else 0.0
        first_at = started + pacing.ttft_s
        if pacing.ttft_s:
            await asyncio.sleep(pacing.ttft_s)
        for seq, text in enumerate(tokens):
            if interval:
                delay = first_at + seq * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            frame = {"type": "token", "id": stream_id, "seq": seq, "text": text}
            await websocket.send_text(orjson.dumps(frame).decode())
        done = {
            "type": "done",
            "id": stream_id,
            "finish_reason": "length",
            "usage": {"prompt_tokens": 0, "completion_tokens": len(tokens)},
        }
        await websocket.send_text(orjson.dumps(done).decode())

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(HELLO)
        try:
            while True:
                request = orjson.loads(await websocket.receive_text())
                if request.get("type") == "generate":
                    await stream(websocket, request)
                elif request.get("type") == "ping":
                    await websocket.send_text('{"type":"pong"}')
        except WebSocketDisconnect:
            return

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor_fastapi")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--ws", default="websockets-sansio")
    parser.add_argument("--loop", default="auto")
    parser.add_argument("--http", default="auto")
    parser.add_argument("--ws-ping-interval-s", type=float, default=20.0)
    args = parser.parse_args(argv)
    app = create_app(Pacing(args.tokens_per_s, args.ttft_ms / 1000.0))
    freeze_after_start()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        ws=args.ws,
        loop=args.loop,
        http=args.http,
        ws_per_message_deflate=False,
        ws_ping_interval=args.ws_ping_interval_s or None,
        ws_ping_timeout=args.ws_ping_interval_s or None,
        log_level="warning",
        lifespan="off",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
