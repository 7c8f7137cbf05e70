"""A small OpenAI-compatible server for fault injection, written on raw asyncio streams so a
test controls every byte: statuses, hangs, malformed events, cut connections.

It runs its own event loop in a thread. Each generation request takes the next ``Plan`` from
``FakeUpstream.plans`` (or ``FakeUpstream.default``); by default it streams the words of the
prompt (or of the last user message) back, honouring ``max_tokens``; like vLLM and SGLang,
it honours ``continue_final_message``: the answer goes on after the final assistant message.
Every request is recorded as a ``Seen`` with the moment its client went away, which is how
a test checks that the gateway closed the upstream response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.echo import split_words


@dataclass
class Plan:
    # ok | status | hang_headers | hang_before | hang_mid | malformed | drop | end_early | drop_before
    # | reject_stream_options | bytewise (``body`` as the event stream, one byte per HTTP chunk)
    # | replay (``body`` as the event stream, one event per HTTP chunk; see ``pause_after``)
    kind: str = "ok"
    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    tokens: list[str] | None = None
    after: int = 1  # tokens sent before a mid-stream fault
    delay_s: float = 0.0
    first_delay_s: float = 0.0  # before the first token: the time to first token
    finish_reason: str | None = None
    usage_in_finish: bool = False  # like `transformers serve`: usage on the finish chunk, no [DONE]
    send_done: bool = True
    send_usage: bool = True
    end_delay_s: float = 0.0  # between [DONE] and the end of the body
    # replay: after this many events, wait for ``resume`` to be set (a test's "now").
    pause_after: int = -1
    resume: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)  # set when it waits
    burst: bool = False  # replay: every event in one HTTP chunk, so they arrive in one read


def continue_after(words: list[str], partial: str) -> list[str]:
    """The rest of the answer ``words`` after its beginning ``partial``."""
    full = "".join(words)
    if not full.startswith(partial):
        return words
    done = 0
    for index, word in enumerate(words):
        if done == len(partial):
            return words[index:]
        done += len(word)
    return [] if done == len(partial) else split_words(full[len(partial):])


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    started_at: float = field(default_factory=time.monotonic)
    gone: threading.Event = field(default_factory=threading.Event)
    gone_at: float = 0.0
    tokens_sent: int = 0
    completed: bool = False
    gone_here: asyncio.Event = field(default_factory=asyncio.Event)  # the same, for the server's loop


class FakeUpstream:
    def __init__(self) -> None:
        self.plans: deque[Plan] = deque()
        self.default = Plan()
        self.models_status = 200
        # Keep-alive: serve requests one after another on each connection, as real servers
        # do; the client's going away is then not watched.
        self.keep_alive = False
        self.connections = 0
        self.requests: list[Seen] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def generation_requests(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.method == "POST"]

    def last(self) -> Seen:
        return self.generation_requests()[-1]

    # Serving ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while await self._serve(reader, writer) and self.keep_alive:
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; whether the connection may carry another."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length) if length else b""
        body = json.loads(raw) if raw else {}
        seen = Seen(method, path, headers, body)
        self.requests.append(seen)
        watcher = None if self.keep_alive else asyncio.ensure_future(self._watch(reader, seen))
        try:
            if method == "GET" and path.endswith("/models"):
                await self._json(writer, self.models_status, {"object": "list", "data": [{"id": "fake-model"}]})
                return True
            plan = self.plans.popleft() if self.plans else self.default
            await self._generate(writer, seen, plan)
            return seen.completed
        except ConnectionError:
            # A write failed because the client went away; the watcher may not have seen
            # the close yet, and is cancelled below: record it here too.
            if not seen.gone.is_set():
                seen.gone_at = time.monotonic()
                seen.gone.set()
                seen.gone_here.set()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _watch(self, reader: asyncio.StreamReader, seen: Seen) -> None:
        """Record when the client closes its end."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024):
                pass
        seen.gone_at = time.monotonic()
        seen.gone.set()
        seen.gone_here.set()

    async def _json(self, writer: asyncio.StreamWriter, status: int, payload: object,
                    headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode() if not isinstance(payload, str) else payload.encode()
        await self._head(writer, status, {"content-type": "application/json",
                                          "content-length": str(len(data)), **(headers or {})})
        writer.write(data)
        await writer.drain()

    async def _head(self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str]) -> None:
        connection = "keep-alive" if self.keep_alive else "close"
        lines = [f"HTTP/1.1 {status} X", f"connection: {connection}", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()

    async def _chunk(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        # Each event goes out in two pieces cut mid-line, so the client must decode incrementally.
        middle = len(data) // 2
        for part in (data[:middle], data[middle:]):
            if part:
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()

    async def _event(self, writer: asyncio.StreamWriter, payload: object) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        await self._chunk(writer, f"data: {text}\n\n".encode())

    async def _until_gone(self, seen: Seen) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(seen.gone_here.wait(), 60)

    async def _generate(self, writer: asyncio.StreamWriter, seen: Seen, plan: Plan) -> None:
        body = seen.body
        kind = plan.kind
        if kind == "reject_stream_options":
            if "stream_options" in body:
                await self._json(writer, 400, {"error": {"message": "Unrecognized request argument: stream_options"}})
                return
            kind = "ok"
        if kind == "status":
            await self._json(writer, plan.status, plan.body, plan.headers)
            return
        if kind == "drop_before":
            writer.transport.abort()
            return
        if kind == "hang_headers":
            await self._until_gone(seen)
            return
        if kind == "bytewise":
            await self._head(writer, 200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
            for byte in plan.body.encode():
                writer.write(b"1\r\n" + bytes([byte]) + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            seen.completed = True
            return
        if kind == "replay":
            await self._replay(writer, seen, plan)
            return
        chat = seen.path.endswith("/chat/completions")
        prompt = body.get("prompt", "")
        if chat:
            messages = body.get("messages") or [{"role": "user", "content": ""}]
            users = [m["content"] for m in messages if m["role"] == "user"] or [messages[-1]["content"]]
            prompt = users[-1]
        words = plan.tokens if plan.tokens is not None else split_words(prompt)
        if chat and body.get("continue_final_message") and messages[-1]["role"] == "assistant":
            # vLLM's continuation: the answer goes on after the final assistant message.
            words = continue_after(words, messages[-1]["content"] or "")
        max_tokens = int(body.get("max_tokens", len(words)))
        tokens = words[:max_tokens]
        finish = plan.finish_reason or ("length" if len(words) > max_tokens else "stop")
        await self._head(writer, 200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})

        def piece(text: str | None, reason: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
            if chat:
                choice["delta"] = {"content": text} if text is not None else {}
            else:
                choice["text"] = text or ""
            return {"id": "cmpl-1", "object": "chunk", "choices": [choice]}

        if chat:
            await self._event(writer, {"id": "cmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                        "content": ""}}]})
        if kind == "hang_before":
            await self._until_gone(seen)
            return
        if plan.first_delay_s:
            await asyncio.sleep(plan.first_delay_s)
        for index, token in enumerate(tokens):
            if kind in ("hang_mid", "malformed", "drop", "end_early") and index == plan.after:
                break
            if index and plan.delay_s:
                await asyncio.sleep(plan.delay_s)
            await self._event(writer, piece(token))
            seen.tokens_sent += 1
        if kind == "hang_mid":
            await self._until_gone(seen)
            return
        if kind == "malformed":
            await self._chunk(writer, b'data: {"choices": [ this is not json\n\n')
            await self._until_gone(seen)
            return
        if kind == "drop":
            writer.transport.abort()
            return
        if kind == "end_early":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        usage = {"prompt_tokens": len(split_words(prompt)), "completion_tokens": len(tokens),
                 "total_tokens": len(split_words(prompt)) + len(tokens)}
        last = piece(None, finish)
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage")) and plan.send_usage
        if plan.usage_in_finish and plan.send_usage:
            last["usage"] = usage
        await self._event(writer, last)
        if wants_usage and not plan.usage_in_finish:
            await self._event(writer, {"id": "cmpl-1", "choices": [], "usage": usage})
        if plan.send_done:
            await self._event(writer, "[DONE]")
        if plan.end_delay_s:
            await asyncio.sleep(plan.end_delay_s)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        seen.completed = True

    async def _replay(self, writer: asyncio.StreamWriter, seen: Seen, plan: Plan) -> None:
        """A recorded event stream, as it was recorded, event by event."""
        await self._head(writer, 200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
        events = [event + "\n\n" for event in plan.body.split("\n\n") if event.strip()]
        if plan.burst:
            await self._chunk(writer, "".join(events).encode())
            events = []
        for index, event in enumerate(events):
            if index == plan.pause_after:
                plan.paused.set()
                await asyncio.to_thread(plan.resume.wait, 30)
            data = event.encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        seen.completed = True
