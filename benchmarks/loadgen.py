"""The load generator: ``python -m benchmarks.loadgen '<json spec>'``.

It runs pinned to its own core (the harness starts it under ``taskset``) and talks to the
server under test only through its WebSocket. It reports on stdout, one line each:

- ``PHASE <name> <process_time> <monotonic>`` at each boundary the harness measures the
  server at (CPU, RSS); the two numbers let the harness compute this process's own CPU
  use over the same interval, which says whether the generator was the bottleneck;
- ``RESULT <json>`` once at the end.

Kinds of run (``spec["kind"]``): ``stream`` (N connections, one generation each, counted
or timed per token), ``idle`` (hold growing numbers of idle connections), ``slow`` (a
timed ``stream`` run, then the same with clients that stop reading alongside).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from benchmarks.wsclient import WSClientProtocol, connect

TOKEN_PREFIX = b'{"type":"token"'
PONG = b'{"type":"pong"}'


def phase(name: str) -> None:
    print(f"PHASE {name} {time.process_time():.6f} {time.monotonic():.6f}", flush=True)


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(eq=False, slots=True)
class Stream:
    id: bytes
    sent_at: float = 0.0
    start_at: float | None = None
    first_at: float | None = None
    last_at: float = 0.0
    last_seq: int = -1
    frames: int = 0
    completion_tokens: int | None = None
    error: str | None = None
    records: list[tuple[float, int, int]] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class Client:
    """One connection's view of the protocol: hello, token frames counted by ``seq``,
    ``done``/``error`` ending a stream, application pings answered."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.hello = asyncio.Event()
        self.streams: dict[bytes, Stream] = {}
        self.protocol: WSClientProtocol | None = None
        self.pings = 0

    def on_text(self, payload: bytes, now: float) -> None:
        if payload.startswith(TOKEN_PREFIX):
            i = payload.index(b'"id":"', 15) + 6
            j = payload.index(b'"', i)
            k = payload.index(b'"seq":', j) + 6
            seq = int(payload[k : payload.index(b",", k)])
            stream = self.streams[payload[i:j]]
            if stream.records is not None:
                stream.records.append((now, stream.last_seq, seq))
            if stream.first_at is None:
                stream.first_at = now
            stream.last_at = now
            stream.last_seq = seq
            stream.frames += 1
            return
        message = orjson.loads(payload)
        kind = message.get("type")
        if kind == "ping":
            self.pings += 1
            if self.protocol is not None:
                self.protocol.send_text(PONG)
        elif kind == "hello":
            self.hello.set()
        elif kind in ("start", "done", "error"):
            sid = message.get("id")
            found = self.streams.get(sid.encode()) if isinstance(sid, str) else None
            if found is None:
                return
            if kind == "start":
                found.start_at = now
            elif kind == "done":
                found.completion_tokens = message.get("usage", {}).get("completion_tokens")
                found.finished.set()
            else:
                found.error = str(message.get("code"))
                found.finished.set()

    def generate(self, stream: Stream, max_tokens: int, model: str | None = None) -> None:
        self.streams[stream.id] = stream
        request: dict[str, Any] = {
            "type": "generate",
            "id": stream.id.decode(),
            "prompt": f"benchmark prompt {stream.id.decode()}",
            "max_tokens": max_tokens,
        }
        if model is not None:
            request["model"] = model
        data = orjson.dumps(request)
        assert self.protocol is not None
        stream.sent_at = time.monotonic()
        self.protocol.send_text(data)


def tokens_for(spec: dict[str, Any], count: int, offset: int = 0) -> list[str | None]:
    secret = spec.get("jwt_secret")
    if not secret:
        return [None] * count
    import jwt

    exp = int(time.time()) + 3600
    prefix = spec.get("user_prefix", "bench")
    return [jwt.encode({"sub": f"{prefix}-{offset + i}", "exp": exp}, secret, algorithm="HS256") for i in range(count)]


async def open_clients(
    spec: dict[str, Any], count: int, *, record: bool = False, offset: int = 0, recv_buffer: int = 0
) -> tuple[list[Client], list[str]]:
    """Open ``count`` connections (bounded concurrency), each waiting for its hello."""
    tokens = tokens_for(spec, count, offset)
    gate = asyncio.Semaphore(int(spec.get("open_concurrency", 100)))
    hello_timeout = float(spec.get("hello_timeout_s", 30.0))
    failures: list[str] = []

    async def one(token: str | None) -> Client | None:
        client = Client(record)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        async with gate:
            try:
                client.protocol = await connect(
                    spec["host"], spec["port"], spec.get("path", "/ws"), client.on_text,
                    headers=headers, recv_buffer=recv_buffer,
                )
                await asyncio.wait_for(client.hello.wait(), hello_timeout)
            except Exception as exc:  # counted and reported, never fatal
                failures.append(type(exc).__name__ + ": " + str(exc)[:120])
                if client.protocol is not None:
                    client.protocol.close()
                return None
        return client

    opened = await asyncio.gather(*(one(t) for t in tokens))
    return [c for c in opened if c is not None], failures


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run_streams(spec: dict[str, Any], clients: list[Client], label: str) -> dict[str, Any]:
    """One generation per client; starts spread evenly over ``stagger_s``."""
    max_tokens = int(spec["max_tokens"])
    stagger = float(spec.get("stagger_s", 0.0))
    timeout = float(spec.get("timeout_s", 60.0))
    record = bool(spec.get("record", False))
    streams = []
    # Ids are unique per run: the gateway's stream store refuses an id used recently, and
    # the throughput scenarios repeat their run against one server.
    run = os.urandom(3).hex()
    for index, client in enumerate(clients):
        stream = Stream(f"{label}{run}-{index}".encode(), records=[] if record else None)
        streams.append((client, stream))
    phase(f"{label}go")
    started = time.monotonic()
    step = stagger / len(streams) if streams else 0.0
    for index, (client, stream) in enumerate(streams):
        if step:
            delay = started + index * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        client.generate(stream, max_tokens)
    waits = [asyncio.ensure_future(s.finished.wait()) for _, s in streams]
    _, pending = await asyncio.wait(waits, timeout=max(0.0, started + timeout - time.monotonic()))
    for task in pending:
        task.cancel()
    phase(f"{label}end")
    ended = time.monotonic()
    return summarize([s for _, s in streams], spec, ended - started, timed_out=len(pending))


def summarize(streams: list[Stream], spec: dict[str, Any], wall_s: float, *, timed_out: int) -> dict[str, Any]:
    tokens = sum(s.last_seq + 1 for s in streams)
    frames = sum(s.frames for s in streams)
    firsts = [s.first_at for s in streams if s.first_at is not None]
    ttfts = sorted(s.first_at - s.sent_at for s in streams if s.first_at is not None)
    lasts = [s.last_at for s in streams if s.first_at is not None]
    span = (max(lasts) - min(firsts)) if firsts else 0.0
    mismatched = sum(
        1 for s in streams if s.completion_tokens is not None and s.completion_tokens != s.last_seq + 1
    )
    errors: dict[str, int] = {}
    for s in streams:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    result: dict[str, Any] = {
        "streams": len(streams),
        "completed": sum(1 for s in streams if s.completion_tokens is not None),
        "timed_out": timed_out,
        "errors": errors,
        "count_mismatches": mismatched,
        "tokens": tokens,
        "frames": frames,
        "span_s": span,
        "wall_s": wall_s,
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "frames_per_s": frames / span if span > 0 else 0.0,
        "tokens_per_frame": tokens / frames if frames else 0.0,
        "ttft_p50_ms": percentile(ttfts, 0.50) * 1000,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
    }
    if spec.get("record"):
        rate = float(spec["tokens_per_s"])
        ttft = float(spec["ttft_s"])
        interval = 1.0 / rate if rate else 0.0
        delays: list[float] = []
        offsets: list[float] = []
        for s in streams:
            base = s.sent_at + ttft
            if s.start_at is not None:
                offsets.append(s.start_at - s.sent_at)
            for now, previous, seq in s.records or ():
                for k in range(previous + 1, seq + 1):
                    delays.append(now - (base + k * interval))
        delays.sort()
        offsets.sort()
        result.update(
            {
                "delay_samples": len(delays),
                "delay_p50_ms": percentile(delays, 0.50) * 1000,
                "delay_p99_ms": percentile(delays, 0.99) * 1000,
                "delay_max_ms": (delays[-1] * 1000) if delays else float("nan"),
                "start_rtt_p50_ms": percentile(offsets, 0.50) * 1000,
            }
        )
    return result


async def kind_stream(spec: dict[str, Any]) -> dict[str, Any]:
    clients, failures = await open_clients(spec, int(spec["connections"]), record=bool(spec.get("record")))
    phase("open")
    result = await run_streams(spec, clients, "s")
    result["open_failures"] = len(failures)
    result["open_failure_examples"] = failures[:3]
    for client in clients:
        assert client.protocol is not None
        client.protocol.close()
    return result


async def kind_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Hold growing numbers of idle connections; the harness reads the server's RSS after
    each ``open-N`` and its CPU between ``open-N`` and ``rest-N``."""
    held: list[Client] = []
    steps = []
    settle = float(spec.get("settle_s", 2.0))
    rest = float(spec.get("rest_s", 5.0))
    await asyncio.sleep(settle)
    phase("baseline")
    failures_total = 0
    for count in spec["counts"]:
        more = int(count) - len(held)
        started = time.monotonic()
        opened, failures = await open_clients(spec, more, offset=len(held)) if more > 0 else ([], [])
        open_s = time.monotonic() - started
        held.extend(opened)
        failures_total += len(failures)
        await asyncio.sleep(settle)
        phase(f"open-{count}")
        await asyncio.sleep(rest)
        phase(f"rest-{count}")
        alive = sum(1 for c in held if c.protocol is not None and not c.protocol.closed.done())
        steps.append(
            {
                "target": int(count),
                "held": len(held),
                "alive_after_rest": alive,
                "open_failures": len(failures),
                "open_failure_examples": failures[:3],
                "open_s": open_s,
                "pings_answered": sum(c.pings for c in held),
            }
        )
    for client in held:
        assert client.protocol is not None
        client.protocol.close()
    await asyncio.sleep(0.2)
    return {"steps": steps, "open_failures": failures_total}


async def kind_slow(spec: dict[str, Any]) -> dict[str, Any]:
    """A timed run of healthy streams, then clients that stop reading join, then the same
    timed run again beside them."""
    healthy = int(spec["connections"])
    clients, failures = await open_clients(spec, healthy, record=True)
    phase("open")
    baseline = await run_streams(spec, clients, "a")
    slow_clients, slow_failures = await open_clients(
        spec, int(spec["slow_connections"]), offset=healthy, recv_buffer=int(spec.get("slow_recv_buffer", 4096))
    )
    for index, client in enumerate(slow_clients):
        client.generate(Stream(f"x{index}".encode()), int(spec["slow_max_tokens"]), model=spec.get("slow_model"))
        assert client.protocol is not None
        client.protocol.pause_reading()
    phase("slow-open")
    await asyncio.sleep(float(spec.get("slow_settle_s", 3.0)))
    phase("slow-settled")
    with_slow = await run_streams(spec, clients, "b")
    await asyncio.sleep(float(spec.get("slow_tail_s", 1.0)))
    phase("tail")
    for client in clients + slow_clients:
        assert client.protocol is not None
        client.protocol.close()
    return {
        "baseline": baseline,
        "with_slow": with_slow,
        "slow_connections": len(slow_clients),
        "open_failures": len(failures) + len(slow_failures),
    }


async def kind_sse(spec: dict[str, Any]) -> dict[str, Any]:
    """N concurrent streaming chat completions over HTTP (Server-Sent Events), as a client of
    an OpenAI-compatible server would make them: the LiteLLM proxy, the upstream itself, or
    the gateway's HTTP API (``api_key`` a JWT).
    Tokens are the chunks whose ``delta.content`` is not empty; the time to first token is
    from sending the request to reading the first of them.

    The client is aiohttp, whose C parser hands over everything that has arrived in one
    read, so the client costs a few microseconds per token and is not what limits the
    upstream's own figure."""
    import aiohttp

    count = int(spec["connections"])
    max_tokens = int(spec["max_tokens"])
    url = f"http://{spec['host']}:{spec['port']}{spec.get('path', '/v1/chat/completions')}"
    headers = {"Authorization": f"Bearer {spec['api_key']}"} if spec.get("api_key") else {}
    streams = [Stream(f"h{index}".encode()) for index in range(count)]
    errors: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession, stream: Stream) -> None:
        body = {"model": spec.get("model", "bench-model"), "stream": True, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"benchmark prompt {stream.id.decode()}"}]}
        stream.sent_at = time.monotonic()
        try:
            async with session.post(url, data=orjson.dumps(body), headers=headers) as response:
                if response.status != 200:
                    errors[f"http_{response.status}"] = errors.get(f"http_{response.status}", 0) + 1
                    return
                pending = b""
                # The gateway's events carry the seq of their last delta as the event id
                # (several deltas may ride in one event); other servers' carry one token each.
                event_id: int | None = None
                while data := await response.content.readany():
                    now = time.monotonic()
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        line = line.rstrip(b"\r")
                        if line.startswith(b"id: "):
                            event_id = int(line[4:])
                            continue
                        if not line.startswith(b"data: ") or line == b"data: [DONE]":
                            continue
                        event = orjson.loads(line[6:])
                        for choice in event.get("choices") or ():
                            if (choice.get("delta") or {}).get("content"):
                                if stream.first_at is None:
                                    stream.first_at = now
                                stream.last_at = now
                                stream.last_seq = event_id if event_id is not None else stream.last_seq + 1
                                stream.frames += 1
                        event_id = None
                        if event.get("usage"):
                            stream.completion_tokens = event["usage"].get("completion_tokens")
            if stream.completion_tokens is None:
                stream.completion_tokens = stream.last_seq + 1
        except Exception as exc:  # counted and reported
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    timeout = aiohttp.ClientTimeout(total=float(spec.get("timeout_s", 120.0)))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=count), timeout=timeout) as session:
        # One warm-up request opens a connection and lets the server load what it loads lazily.
        warm = Stream(b"warm")
        await one(session, warm)
        phase("sgo")
        started = time.monotonic()
        await asyncio.gather(*(one(session, stream) for stream in streams))
        phase("send")
        result = summarize(streams, spec, time.monotonic() - started, timed_out=0)
    result["errors"] = errors
    result["open_failures"] = 0
    return result


KINDS = {"stream": kind_stream, "idle": kind_idle, "slow": kind_slow, "sse": kind_sse}


async def amain(spec: dict[str, Any]) -> dict[str, Any]:
    random.seed(0)
    return await KINDS[spec["kind"]](spec)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    raise_nofile_limit()
    try:
        import uvloop
    except ImportError:  # the client still works, at a higher cost per frame
        result = asyncio.run(amain(spec))
        result["client_loop"] = "asyncio"
    else:
        result = uvloop.run(amain(spec))
        result["client_loop"] = "uvloop"
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
