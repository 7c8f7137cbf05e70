"""What the ``openai`` backend alone costs per token:
``python -m benchmarks.backend_cost [--tokens N] [--runs R]``.

It starts the benchmark upstream (``upstream.py``) pinned to the load generator's core,
then, in this process pinned to the server core, streams one completion after another
through ``OpenAIBackend.stream`` and counts the tokens: no gateway, no WebSocket. It prints
tokens/s and this process's CPU per token for each run, and the median. This is the part
of the peer comparison that depends on the HTTP client and the SSE decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import choose_pinning
from benchmarks.peer import MODEL, upstream_process
from config import Settings
from gateway.backends.base import GenerationRequest, TokenChunk
from gateway.backends.openai import OpenAIBackend, OpenAISettings


async def measure(port: int, tokens: int, runs: int) -> list[tuple[float, float]]:
    upstream = OpenAISettings(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL)
    settings = Settings(jwt_secret="x" * 32, backend="openai", backend_settings=upstream)
    backend = OpenAIBackend(settings)
    await backend.start()
    results = []
    try:
        for run in range(runs + 1):
            request = GenerationRequest(id=f"r{run}", user="bench", prompt="benchmark", max_tokens=tokens)
            wall, cpu, count = time.perf_counter(), time.process_time(), 0
            async for chunk in backend.stream(request):
                if type(chunk) is TokenChunk:
                    count += 1
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if run:  # the first run opens the connection
                results.append((count / wall, 1e6 * cpu / max(count, 1)))
    finally:
        await backend.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backend_cost")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    pinning = choose_pinning()
    if pinning.server and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(pinning.server[-1])})
    with tempfile.TemporaryDirectory() as workdir:
        upstream = upstream_process(pinning, Path(workdir))
        try:
            try:
                import uvloop
            except ImportError:
                results = asyncio.run(measure(upstream.port, args.tokens, args.runs))
            else:
                results = uvloop.run(measure(upstream.port, args.tokens, args.runs))
        finally:
            upstream.stop()
    for rate, cpu_us in results:
        print(f"{args.tokens:,} tokens: {rate:,.0f} tokens/s, {cpu_us:.1f} µs CPU per token")
    print(f"median: {statistics.median(r for r, _ in results):,.0f} tokens/s, "
          f"{statistics.median(c for _, c in results):.1f} µs CPU per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
