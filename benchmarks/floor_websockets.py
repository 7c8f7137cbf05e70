"""The second floor: the raw ``websockets`` library server, no ASGI, no framework.

Same frames and pacing as ``floor_fastapi``; it shows what the WebSocket library alone
costs under the same event loop.

``python -m benchmarks.floor_websockets --port P [--tokens-per-s R --ttft-ms T --loop uvloop|asyncio]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from benchmarks.floor_common import HELLO, Pacing, freeze_after_start, schedule_tokens


async def stream(websocket: ServerConnection, request: dict[str, object], pacing: Pacing) -> None:
    stream_id = str(request.get("id", "r"))
    tokens = schedule_tokens(request)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await websocket.send(orjson.dumps({"type": "start", "id": stream_id}).decode())
    interval = 1.0 / pacing.tokens_per_s if pacing.tokens_per_s else 0.0
    first_at = started + pacing.ttft_s
    if pacing.ttft_s:
        await asyncio.sleep(pacing.ttft_s)
    for seq, text in enumerate(tokens):
        if interval:
            delay = first_at + seq * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await websocket.send(orjson.dumps({"type": "token", "id": stream_id, "seq": seq, "text": text}).decode())
    done = {
        "type": "done",
        "id": stream_id,
        "finish_reason": "length",
        "usage": {"prompt_tokens": 0, "completion_tokens": len(tokens)},
    }
    await websocket.send(orjson.dumps(done).decode())


async def run(port: int, pacing: Pacing, ping_interval: float | None) -> None:
    async def handler(websocket: ServerConnection) -> None:
        try:
            await websocket.send(HELLO)
            async for message in websocket:
                request = orjson.loads(message)
                if request.get("type") == "generate":
                    await stream(websocket, request, pacing)
                elif request.get("type") == "ping":
                    await websocket.send('{"type":"pong"}')
        except ConnectionClosed:
            return

    async with serve(
        handler, "127.0.0.1", port, compression=None, ping_interval=ping_interval, ping_timeout=ping_interval,
        backlog=2048,
    ) as server:
        freeze_after_start()
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor_websockets")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--ws-ping-interval-s", type=float, default=20.0)
    args = parser.parse_args(argv)
    main_coro = run(args.port, Pacing(args.tokens_per_s, args.ttft_ms / 1000.0), args.ws_ping_interval_s or None)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main_coro)
    else:
        asyncio.run(main_coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
