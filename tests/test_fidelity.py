"""Everything a model streams reaches the client: answer text, reasoning and tool calls,
from event streams in the shapes upstreams send (``tests/fixtures/upstream/``), through a
real gateway with the openai backend, byte for byte, also across a resume and for a slow
reader whose frames are coalesced."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.client import GatewayClient, ReasoningPart, Streams, StreamState, TextPart, ToolCallPart
from tests.fake_upstream import FakeUpstream, Plan
from tests.redis_support import TEST_REDIS_URL, require_redis, unique_prefix
from tests.support import RawClient, Serve, ServerThread, connected, make_settings, mint, recv_until, terminal_for
from tests.tcp_proxy import CuttableProxy
from tests.test_close_codes import run_module

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "upstream"
RECORDED = sorted(path.stem for path in FIXTURES.glob("*.sse"))
DELTA_FRAMES = ("token", "reasoning", "tool_call")


def recorded(name: str) -> str:
    return (FIXTURES / f"{name}.sse").read_text()


@dataclass
class Answer:
    """What a stream adds up to: the text, the reasoning, each call by index."""

    content: str = ""
    reasoning: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    deltas: int = 0  # pieces of any kind, each one seq


def expected_from(body: str) -> Answer:
    """What the upstream sent, read straight from its events."""
    answer = Answer()
    for line in body.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        if event.get("usage"):
            answer.usage = event["usage"]
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            content = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            answer.content += content
            answer.reasoning += reasoning
            answer.deltas += bool(content) + bool(reasoning)
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                answer.deltas += call["index"] not in answer.calls or bool(function.get("arguments"))
                entry = answer.calls.setdefault(call["index"], {"call_id": "", "name": "", "arguments": ""})
                entry["call_id"] = entry["call_id"] or call.get("id") or ""
                entry["name"] = entry["name"] or function.get("name") or ""
                entry["arguments"] += function.get("arguments") or ""
            answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
    return answer


def assembled(frames: list[dict[str, Any]], stream_id: str) -> Answer:
    """What a client makes of the frames, checking the protocol's promises on the way: one
    seq space that strictly increases, a call's id and name on its first frame only."""
    answer = Answer()
    last = -1
    for frame in frames:
        if frame.get("id") != stream_id:
            continue
        kind = frame["type"]
        if kind in DELTA_FRAMES:
            assert frame["seq"] > last, frame
            last = frame["seq"]
        if kind == "token":
            answer.content += frame["text"]
        elif kind == "reasoning":
            answer.reasoning += frame["text"]
        elif kind == "tool_call":
            index = frame["index"]
            if index not in answer.calls:
                assert "call_id" in frame and "name" in frame, frame
                answer.calls[index] = {"call_id": frame["call_id"], "name": frame["name"], "arguments": ""}
            else:
                assert "call_id" not in frame and "name" not in frame, frame
            answer.calls[index]["arguments"] += frame["arguments"]
        elif kind == "done":
            answer.finish_reason = frame["finish_reason"]
            answer.usage = frame["usage"]
    return answer


def same_stream(got: Answer, want: Answer) -> None:
    assert got.content == want.content
    assert got.reasoning == want.reasoning
    assert got.calls == want.calls
    assert got.finish_reason == want.finish_reason


def gateway(serve: Serve, upstream: FakeUpstream, **overrides: Any) -> ServerThread:
    return serve(make_settings(backend="openai", openai_base_url=upstream.base_url, upstream_idle_timeout_s=10.0,
                               **overrides))


@pytest.fixture
def upstream() -> Any:
    with FakeUpstream() as fake:
        yield fake


@pytest.mark.parametrize("name", RECORDED)
async def test_a_recorded_stream_reaches_the_client_byte_for_byte(serve: Serve, upstream: FakeUpstream,
                                                                   name: str) -> None:
    body = recorded(name)
    upstream.plans.append(Plan(kind="replay", body=body))
    server = gateway(serve, upstream)
    async with connected(server, mint()) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "r1", "prompt": "go"}))
        frames = await recv_until(ws, terminal_for("r1"))
    want = expected_from(body)
    got = assembled(frames, "r1")
    same_stream(got, want)
    usage = want.usage
    assert got.usage["prompt_tokens"] == usage["prompt_tokens"]
    assert got.usage["completion_tokens"] == usage["completion_tokens"]
    details = usage.get("completion_tokens_details") or {}
    assert got.usage.get("reasoning_tokens") == details.get("reasoning_tokens")
    assert got.usage.get("cached_tokens") == (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    # One seq space for every kind: the last frame's seq counts them all.
    assert [f for f in frames if f["type"] in DELTA_FRAMES][-1]["seq"] == want.deltas - 1


@pytest.mark.parametrize(("name", "pause_after", "kind"), [
    ("vllm_reasoning", 12, "reasoning"),
    ("ollama_reasoning", 5, "reasoning"),
    ("openai_tool_call", 6, "tool_call"),
    ("openai_parallel_tool_calls", 9, "tool_call"),
])
async def test_a_resume_in_the_middle_of_reasoning_or_of_a_tool_call_loses_and_repeats_nothing(
        serve: Serve, upstream: FakeUpstream, name: str, pause_after: int, kind: str) -> None:
    body = recorded(name)
    plan = Plan(kind="replay", body=body, pause_after=pause_after)
    upstream.plans.append(plan)
    server = gateway(serve, upstream, resume_grace_s=10)
    try:
        async with connected(server, mint("ann")) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "r1", "prompt": "go"}))
            first = await recv_until(ws, lambda f: f["type"] == kind)
            await anyio.to_thread.run_sync(plan.paused.wait, 10)
        after = max(f["seq"] for f in first if f["type"] in DELTA_FRAMES)
        async with connected(server, mint("ann")) as ws:
            await ws.send(json.dumps({"type": "resume", "id": "r1", "after": after}))
            resumed = await recv_until(ws, lambda f: f["type"] == "start")
            plan.resume.set()
            resumed += await recv_until(ws, terminal_for("r1"))
    finally:
        plan.resume.set()
    want = expected_from(body)
    held = assembled(first, "r1")
    # The drop happened in the middle of that kind: some of it had arrived, not all.
    if kind == "reasoning":
        assert held.reasoning and len(held.reasoning) < len(want.reasoning)
    else:
        assert held.calls and held.calls != want.calls
    assert all(f["seq"] > after for f in resumed if f["type"] in DELTA_FRAMES)
    same_stream(assembled(first + resumed, "r1"), want)


@pytest.mark.parametrize("name", ["vllm_reasoning", "openai_parallel_tool_calls"])
async def test_a_slow_reader_gets_coalesced_frames_that_never_mix_kinds(serve: Serve, upstream: FakeUpstream,
                                                                         name: str) -> None:
    body = recorded(name)
    # Every event in one read: the deltas queue up behind the first and are written together.
    plan = Plan(kind="replay", body=body, burst=True)
    upstream.plans.append(plan)
    server = gateway(serve, upstream)
    reader = RawClient(server.port, mint())
    try:
        reader.send_json({"type": "generate", "id": "r1", "prompt": "go"})
        deadline = time.monotonic() + 10
        while not any(f.get("type") in ("done", "error") for f in reader.frames):
            assert time.monotonic() < deadline, "no terminal frame"
            await anyio.to_thread.run_sync(reader.read_some)
    finally:
        reader.close()
    frames = reader.frames
    want = expected_from(body)
    same_stream(assembled(frames, "r1"), want)
    deltas = [f for f in frames if f.get("type") in DELTA_FRAMES]
    sent = deltas[-1]["seq"] + 1
    assert len(deltas) < sent  # merged
    assert server.metric("gateway_coalesced_tokens_total") == sent - len(deltas)


# The Python client ---------------------------------------------------------------------------


def test_the_client_bookkeeping_types_parts_and_assembles_tool_calls() -> None:
    streams = Streams()
    streams.add(StreamState("a", {"type": "generate", "id": "a", "prompt": "p"}))
    streams.on_open()
    frames = [
        {"type": "reasoning", "id": "a", "seq": 0, "text": "hm"},
        {"type": "token", "id": "a", "seq": 1, "text": "Hi"},
        {"type": "tool_call", "id": "a", "seq": 2, "index": 0, "call_id": "c0", "name": "f", "arguments": "{\"a\""},
        {"type": "tool_call", "id": "a", "seq": 3, "index": 1, "call_id": "c1", "name": "g", "arguments": "{}"},
        {"type": "tool_call", "id": "a", "seq": 2, "index": 0, "call_id": "c0", "name": "f", "arguments": "{\"a\""},
        {"type": "tool_call", "id": "a", "seq": 4, "index": 0, "arguments": ":1}"},
        {"type": "reasoning", "id": "a", "seq": 4, "text": "replayed"},
    ]
    parts = [d.part for f in frames for d in streams.on_frame(f)[0]]
    assert parts == [ReasoningPart("hm"), TextPart("Hi"), ToolCallPart(0, "{\"a\"", "c0", "f"),
                     ToolCallPart(1, "{}", "c1", "g"), ToolCallPart(0, ":1}")]
    (end,), _ = streams.on_frame({"type": "done", "id": "a", "finish_reason": "tool_calls", "usage": {}})
    assert end.terminal is not None and end.terminal["tool_calls"] == [
        {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
        {"id": "c1", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    assert end.stream.reasoning == ["hm"] and end.stream.texts == ["Hi"]


@pytest.mark.parametrize("name", ["vllm_reasoning", "openai_parallel_tool_calls", "ollama_tool_call"])
async def test_the_client_yields_text_typed_parts_and_assembled_tool_calls(serve: Serve, upstream: FakeUpstream,
                                                                            name: str) -> None:
    body = recorded(name)
    upstream.plans.append(Plan(kind="replay", body=body))
    server = gateway(serve, upstream)
    async with GatewayClient(server.url, mint()) as client:
        answer = await client.generate("go")
        with anyio.fail_after(10):
            texts = [text async for text in answer]
            parts = [part async for part in answer.parts()]
            terminal = await answer.result()
    want = expected_from(body)
    assert "".join(texts) == answer.text == want.content
    assert "".join(p.text for p in parts if isinstance(p, ReasoningPart)) == answer.reasoning == want.reasoning
    assert {p.kind for p in parts} <= {"text", "reasoning", "tool_call"}
    calls = [{"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
             for _, c in sorted(want.calls.items())]
    assert answer.tool_calls == calls
    assert terminal.get("tool_calls", []) == calls
    assert terminal["finish_reason"] == want.finish_reason


async def test_the_client_resumes_in_the_middle_of_reasoning(serve: Serve, upstream: FakeUpstream) -> None:
    body = recorded("vllm_reasoning")
    plan = Plan(kind="replay", body=body, pause_after=10)
    upstream.plans.append(plan)
    server = gateway(serve, upstream, resume_grace_s=10)
    try:
        with CuttableProxy(server.port) as proxy:
            async with GatewayClient(proxy.url, mint(), min_backoff_s=0.05, max_backoff_s=0.1) as client:
                answer = await client.generate("go")
                with anyio.fail_after(20):
                    parts = []
                    async for part in answer.parts():
                        parts.append(part)
                        if proxy.cuts == 0:
                            await anyio.to_thread.run_sync(plan.paused.wait, 10)
                            proxy.cut()
                            while client.opens < 2:
                                await client.state_changed()
                            plan.resume.set()
                    await answer.result()
    finally:
        plan.resume.set()
    want = expected_from(body)
    assert client.opens == 2
    assert answer.reasoning == want.reasoning and answer.text == want.content
    assert "".join(p.text for p in parts if isinstance(p, ReasoningPart)) == want.reasoning


# The browser SDK, under node, on a socket the test plays the server of -----------------------


def test_the_browser_sdk_yields_text_typed_parts_and_assembled_tool_calls() -> None:
    frames = [
        {"type": "start", "id": "a", "epoch": "e1"},
        {"type": "reasoning", "id": "a", "seq": 0, "text": "hm"},
        {"type": "token", "id": "a", "seq": 1, "text": "Hi"},
        {"type": "tool_call", "id": "a", "seq": 2, "index": 0, "call_id": "c0", "name": "f", "arguments": "{\"a\""},
        {"type": "tool_call", "id": "a", "seq": 3, "index": 1, "call_id": "c1", "name": "g", "arguments": "{}"},
        {"type": "tool_call", "id": "a", "seq": 2, "index": 0, "call_id": "c0", "name": "f", "arguments": "{\"a\""},
        {"type": "tool_call", "id": "a", "seq": 4, "index": 0, "arguments": ":1}"},
        {"type": "done", "id": "a", "finish_reason": "tool_calls",
         "usage": {"prompt_tokens": 1, "completion_tokens": 5}},
    ]
    seen = run_module(f"""
class FakeSocket {{
  constructor() {{ FakeSocket.last = this; this.readyState = 1; this.sent = []; }}
  send(text) {{ this.sent.push(JSON.parse(text)); }}
  close() {{}}
}}
const client = sdk.connect({{ url: "ws://gateway.test/ws", token: "t", WebSocket: FakeSocket }});
await new Promise((resolve) => setTimeout(resolve, 0));
const socket = FakeSocket.last;
socket.onmessage({{ data: JSON.stringify({{ type: "hello", heartbeat_s: 15 }}) }});
const answer = client.generate("hi", {{ id: "a" }});
const listened = [];
answer.onPart((part) => listened.push(part.kind));
for (const frame of {json.dumps(frames)}) socket.onmessage({{ data: JSON.stringify(frame) }});
const texts = [];
for await (const text of answer) texts.push(text);
const parts = [];
for await (const part of answer.parts()) parts.push(part);
const terminal = await answer.done;
client.close();
console.log(JSON.stringify({{ texts, parts, listened, reasoning: answer.reasoning, text: answer.text,
                              toolCalls: answer.toolCalls, terminal, tokens: answer.tokens }}));
""")
    assert seen["texts"] == ["Hi"] and seen["text"] == "Hi" and seen["reasoning"] == "hm"
    assert seen["parts"] == [
        {"kind": "reasoning", "text": "hm"}, {"kind": "text", "text": "Hi"},
        {"kind": "tool_call", "index": 0, "callId": "c0", "name": "f", "arguments": "{\"a\""},
        {"kind": "tool_call", "index": 1, "callId": "c1", "name": "g", "arguments": "{}"},
        {"kind": "tool_call", "index": 0, "arguments": ":1}"},
    ]
    assert seen["listened"] == ["reasoning", "text", "tool_call", "tool_call", "tool_call"]
    calls = [{"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
             {"id": "c1", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    assert seen["toolCalls"] == calls
    assert seen["terminal"]["tool_calls"] == calls and seen["terminal"]["finish_reason"] == "tool_calls"
    assert seen["tokens"] == 5


# The stores keep the kinds ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "after_kind"), [("ollama_tool_call", "reasoning"),
                                                   ("openai_parallel_tool_calls", "tool_call")])
async def test_a_finished_generation_replays_every_kind_from_the_store(serve: Serve, upstream: FakeUpstream,
                                                                       name: str, after_kind: str) -> None:
    body = recorded(name)
    upstream.plans.append(Plan(kind="replay", body=body))
    server = gateway(serve, upstream)
    async with connected(server, mint("bo")) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "r1", "prompt": "go"}))
        original = await recv_until(ws, terminal_for("r1"))
    # After the first delta of that kind: the replay comes from the store, not the generation.
    after = next(f["seq"] for f in original if f["type"] == after_kind)
    async with connected(server, mint("bo")) as ws:
        await ws.send(json.dumps({"type": "resume", "id": "r1", "after": after}))
        replay = await recv_until(ws, terminal_for("r1"))
    held = [f for f in original if f["type"] not in DELTA_FRAMES or f["seq"] <= after]
    assert any(f["type"] in DELTA_FRAMES for f in replay)
    same_stream(assembled(held + replay, "r1"), expected_from(body))
    assert replay[-1] == original[-1]


async def test_a_resume_on_another_process_relays_every_kind_from_redis(serve: Serve, upstream: FakeUpstream) -> None:
    require_redis()
    body = recorded("openai_parallel_tool_calls")
    plan = Plan(kind="replay", body=body, pause_after=9)
    upstream.plans.append(plan)
    shared = {"cluster_url": TEST_REDIS_URL, "redis_prefix": unique_prefix(), "resume_grace_s": 10}
    producer = gateway(serve, upstream, **shared)
    other = gateway(serve, upstream, **shared)
    try:
        async with connected(producer, mint("cy")) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "r1", "prompt": "go"}))
            first = await recv_until(ws, lambda f: f["type"] == "tool_call" and f["index"] == 1)
            await anyio.to_thread.run_sync(plan.paused.wait, 10)
        after = max(f["seq"] for f in first if f["type"] in DELTA_FRAMES)
        async with connected(other, mint("cy")) as ws:
            await ws.send(json.dumps({"type": "resume", "id": "r1", "after": after}))
            resumed = await recv_until(ws, lambda f: f["type"] == "start")
            plan.resume.set()
            resumed += await recv_until(ws, terminal_for("r1"))
    finally:
        plan.resume.set()
    want = expected_from(body)
    assert assembled(first, "r1").calls != want.calls  # dropped in the middle of the second call
    same_stream(assembled(first + resumed, "r1"), want)


async def test_a_room_gets_every_kind(serve: Serve, upstream: FakeUpstream) -> None:
    body = recorded("ollama_tool_call")
    upstream.plans.append(Plan(kind="replay", body=body))
    server = gateway(serve, upstream)
    async with connected(server, mint("fay", rooms=["lobby"])) as a, connected(server, mint("gus", rooms="*")) as b:
        for ws in (a, b):
            await ws.send(json.dumps({"type": "join", "room": "lobby"}))
            await recv_until(ws, lambda f: f["type"] == "joined")
        await b.send(json.dumps({"type": "generate", "id": "ai", "room": "lobby", "prompt": "go"}))
        seen = [await recv_until(ws, terminal_for("ai")) for ws in (a, b)]
    want = expected_from(body)
    for frames in seen:
        same_stream(assembled(frames, "ai"), want)


async def test_a_cancel_in_the_middle_of_reasoning_counts_what_was_streamed(serve: Serve,
                                                                           upstream: FakeUpstream) -> None:
    plan = Plan(kind="replay", body=recorded("vllm_reasoning"), pause_after=8)
    upstream.plans.append(plan)
    server = gateway(serve, upstream)
    try:
        async with connected(server, mint()) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "r1", "prompt": "go"}))
            await anyio.to_thread.run_sync(plan.paused.wait, 10)
            # Events 1-7 carry one reasoning delta each (event 0 is the role).
            frames = await recv_until(ws, lambda f: f["type"] == "reasoning" and f["seq"] == 6)
            await ws.send(json.dumps({"type": "cancel", "id": "r1"}))
            frames += await recv_until(ws, terminal_for("r1"))
    finally:
        plan.resume.set()
    done = frames[-1]
    assert done["finish_reason"] == "cancelled"
    assert done["usage"] == {"prompt_tokens": 0, "completion_tokens": 7, "reasoning_tokens": 7}
