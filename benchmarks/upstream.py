"""A fast local OpenAI-compatible upstream for the peer comparison:
``python -m benchmarks.upstream --port P [--tokens-per-s R]``.

It answers ``POST /v1/chat/completions`` with ``stream: true`` as Server-Sent Events in
HTTP/1.1 chunked encoding (keep-alive), one ``delta.content`` chunk per token, then the
finish chunk, a usage chunk when ``stream_options.include_usage`` asks for it, and
``[DONE]``; ``GET /v1/models`` lists one model. Written on raw asyncio streams under
uvloop, it costs a fraction of either proxy per chunk, so both measure themselves.

The text varies from chunk to chunk (a word and its index): the LiteLLM proxy ends a
stream after 100 identical chunks in a row (``REPEATED_STREAMING_CHUNK_LIMIT``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")
MODEL = "bench-model"


def token_text(index: int) -> str:
    return f" {WORDS[index % len(WORDS)]}{index}"


def chunk(payload: bytes) -> bytes:
    """One HTTP chunk holding one SSE event."""
    data = b"data: " + payload + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Upstream:
    def __init__(self, tokens_per_s: float) -> None:
        self.interval = 1.0 / tokens_per_s if tokens_per_s else 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                if method == "GET" and path.rstrip("/").endswith("/models"):
                    await self.json(writer, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                elif method == "POST" and path.rstrip("/").endswith("/chat/completions"):
                    await self.stream(writer, orjson.loads(body or b"{}"))
                else:
                    await self.json(writer, {"error": {"message": "not found"}}, status="404 Not Found")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def json(self, writer: asyncio.StreamWriter, obj: object, status: str = "200 OK") -> None:
        body = orjson.dumps(obj)
        writer.write(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                     "connection: keep-alive\r\n\r\n".encode() + body)
        await writer.drain()

    async def stream(self, writer: asyncio.StreamWriter, request: dict[str, object]) -> None:
        count = int(request.get("max_tokens") or request.get("max_completion_tokens") or 16)  # type: ignore[call-overload]
        options = request.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        model = str(request.get("model") or MODEL)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                     b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n")
        prefix = b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":' + orjson.dumps(model)
        writer.write(chunk(prefix + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                                    b'"finish_reason":null}]}'))
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index in range(count):
            if self.interval:
                delay = started + index * self.interval - loop.time()
                if delay > 0:
                    await writer.drain()
                    await asyncio.sleep(delay)
            writer.write(chunk(prefix + b',"choices":[{"index":0,"delta":{"content":' + orjson.dumps(token_text(index))
                               + b'},"finish_reason":null}]}'))
            if index % 64 == 63:
                await writer.drain()
        writer.write(chunk(prefix + b',"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}'))
        if usage:
            writer.write(chunk(prefix + b',"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":'
                               + str(count).encode() + b',"total_tokens":' + str(count + 1).encode() + b"}}"))
        writer.write(chunk(b"[DONE]") + b"0\r\n\r\n")
        await writer.drain()


async def serve(port: int, tokens_per_s: float) -> None:
    upstream = Upstream(tokens_per_s)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="pace per stream; 0: as fast as possible")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.tokens_per_s))
    else:
        uvloop.run(serve(args.port, args.tokens_per_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
