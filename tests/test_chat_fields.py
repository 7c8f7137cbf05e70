"""The Chat Completions fields of ``generate``: strict validation that names the field,
backends that refuse what they cannot honour, the openai backend passing them through, the
synthetic backend's tool call, and the rules for coalescing deltas of several kinds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backends.synthetic import example_value
from gateway.wire.coalesce import OutItem, Reasoning, StreamRef, Token, ToolCallFragment, coalesce
from gateway.wire.errors import FrameError
from gateway.wire.events import ToolCallDelta
from gateway.wire.inbound import GenerateMessage, parse_client_frame
from tests.fake_upstream import FakeUpstream
from tests.support import Serve, connected, make_settings, mint, recv_until, terminal_for

pytestmark = pytest.mark.anyio

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}, "hourly": {"type": "boolean"}},
        "required": ["city"]}}}
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
         "AAAABJRU5ErkJggg==")
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is in this picture, and the weather?"},
                                 {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
]
EVERYTHING: dict[str, Any] = {
    "type": "generate", "id": "all", "messages": CONVERSATION, "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
    "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"},
                                                               "strict": True}},
    "seed": 7, "reasoning_effort": "low", "frequency_penalty": 0.5, "presence_penalty": -0.5, "max_tokens": 20,
}


def refused(frame: dict[str, Any]) -> str:
    with pytest.raises(FrameError) as info:
        parse_client_frame(json.dumps(frame))
    return info.value.message


def generate(**fields: Any) -> dict[str, Any]:
    return {"type": "generate", "prompt": "hi", **fields}


def test_every_field_parses() -> None:
    message = parse_client_frame(json.dumps(EVERYTHING))
    assert isinstance(message, GenerateMessage)
    assert message.seed == 7 and message.reasoning_effort == "low" and message.tools is not None
    # Text and tool-call arguments count toward the prompt limit; images do not.
    texts = ["Be brief.", "What is in this picture, and the weather?", "{\"city\":\"Paris\"}", "21 C, sunny"]
    assert message.prompt_chars() == sum(map(len, texts))


@pytest.mark.parametrize(("frame", "names"), [
    ({"type": "generate", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://example.com/a.png"}}]}]},
     "messages.0.content.0.image_url.url: must be an https: or a data: URL"),
    ({"type": "generate", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages.0.content.0"),
    ({"type": "generate", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ({"type": "generate", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"type": "generate", "messages": [{"role": "user", "content": "x", "tool_calls": CONVERSATION[2]["tool_calls"]}]},
     "messages.0.tool_calls"),
    ({"type": "generate", "messages": [{"role": "assistant", "content": None}]}, "messages.0.content"),
    ({"type": "generate", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
    (generate(tools=[{"type": "function", "function": {"name": "no spaces"}}]), "tools.0.function.name"),
    (generate(tools=[{"type": "retrieval"}]), "tools.0.type"),
    (generate(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (generate(tool_choice="auto"), "tool_choice: needs tools"),
    (generate(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "other"}}),
     "tool_choice: names a function that is not in tools"),
    (generate(parallel_tool_calls="yes"), "parallel_tool_calls"),
    (generate(response_format={"type": "xml"}), "response_format"),
    (generate(response_format={"type": "json_schema", "json_schema": {}}), "response_format.json_schema.name"),
    (generate(seed=1.5), "seed"),
    (generate(reasoning_effort="extreme"), "reasoning_effort"),
    (generate(frequency_penalty=3), "frequency_penalty"),
    (generate(presence_penalty="0"), "presence_penalty"),
])
def test_a_bad_field_is_named(frame: dict[str, Any], names: str) -> None:
    message = refused(frame)
    assert message.startswith(names), message


async def test_bad_input_over_a_socket_is_bad_request_naming_the_field(serve: Serve) -> None:
    async with connected(serve(), mint()) as ws:
        await ws.send(json.dumps(generate(id="b1", seed="7")))
        frames = await recv_until(ws, terminal_for("b1"))
        assert frames[-1]["code"] == "bad_request" and frames[-1]["message"].startswith("seed:")
        await ws.send(json.dumps({"type": "ping"}))
        await recv_until(ws, lambda f: f["type"] == "pong")  # the connection stays open


@pytest.mark.parametrize(("backend", "fields", "named"), [
    ("echo", {"tools": [WEATHER]}, "tools: the echo backend does not support tools"),
    ("echo", {"messages": CONVERSATION[:2]}, "messages.1.content.1: the echo backend does not support images"),
    ("echo", {"messages": CONVERSATION}, "messages.1.content.1: the echo backend does not support images"),
    ("echo", {"messages": CONVERSATION[2:]}, "messages.0.tool_calls: the echo backend does not support tools"),
    ("echo", {"response_format": {"type": "json_object"}}, "response_format: the echo backend does not support"),
    ("echo", {"reasoning_effort": "high"}, "reasoning_effort: the echo backend does not support"),
    ("echo", {"presence_penalty": 1.0}, "presence_penalty: the echo backend does not support penalties"),
    ("synthetic", {"messages": CONVERSATION[:2]}, "messages.1.content.1: the synthetic backend does not support"),
    ("openai_completions", {"tools": [WEATHER]}, "tools: the openai backend does not support tools"),
    ("openai_completions", {"messages": CONVERSATION[:2]}, "messages.1.content.1: the openai backend does not"),
])
async def test_a_backend_refuses_what_it_cannot_honour_naming_the_field(
        serve: Serve, backend: str, fields: dict[str, Any], named: str) -> None:
    with FakeUpstream() as upstream:
        if backend == "openai_completions":
            server = serve(backend="openai", openai_api="completions", openai_base_url=upstream.base_url)
        else:
            server = serve(backend=backend)
        frame: dict[str, Any] = {"type": "generate", "id": "x1", **fields}
        if "messages" not in fields:
            frame["prompt"] = "hi"
        async with connected(server, mint()) as ws:
            await ws.send(json.dumps(frame))
            frames = await recv_until(ws, terminal_for("x1"))
        assert upstream.generation_requests() == []
    assert [f["type"] for f in frames] == ["error"]  # refused before it started
    assert frames[0]["code"] == "bad_request" and frames[0]["message"].startswith(named), frames[0]


async def test_the_openai_backend_passes_every_field_through(serve: Serve) -> None:
    with FakeUpstream() as upstream:
        server = serve(backend="openai", openai_base_url=upstream.base_url)
        async with connected(server, mint()) as ws:
            await ws.send(json.dumps(EVERYTHING))
            await recv_until(ws, terminal_for("all"))
        body = upstream.last().body
    assert body["messages"] == CONVERSATION
    for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format", "seed", "reasoning_effort",
                 "frequency_penalty", "presence_penalty"):
        assert body[name] == EVERYTHING[name], name


async def test_the_synthetic_backend_calls_the_first_tool_with_arguments_from_its_schema(serve: Serve) -> None:
    server = serve(backend="synthetic", synthetic_tokens_per_s=0)
    async with connected(server, mint()) as ws:
        await ws.send(json.dumps(generate(id="t1", tools=[WEATHER, {"type": "function", "function": {"name": "x"}}])))
        frames = await recv_until(ws, terminal_for("t1"))
        await ws.send(json.dumps({"type": "generate", "id": "t2", "messages": [
            {"role": "user", "content": "weather?"}, *CONVERSATION[2:]], "tools": [WEATHER]}))
        answered = await recv_until(ws, terminal_for("t2"))
    calls = [f for f in frames if f["type"] == "tool_call"]
    assert calls[0]["index"] == 0 and calls[0]["name"] == "get_weather" and calls[0]["call_id"].startswith("call_")
    assert all(f["index"] == 0 and "name" not in f for f in calls[1:])
    arguments = json.loads("".join(f["arguments"] for f in calls))
    assert arguments == {"city": "synthetic", "unit": "celsius", "days": 1, "hourly": True}
    assert frames[-1]["finish_reason"] == "tool_calls"
    assert frames[-1]["usage"]["completion_tokens"] == calls[-1]["seq"] + 1
    # Given the tool's result, it answers in text.
    assert {f["type"] for f in answered} == {"start", "token", "done"}


def test_example_values_follow_the_schema() -> None:
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}}, "n": {"type": ["null", "number"]},
        "mode": {"const": "fast"}, "opt": {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
        "d": {"type": "integer", "default": 3}, "nested": {"properties": {"x": {"type": "integer"}}}}}
    assert example_value(schema) == {"tags": ["synthetic"], "n": 1.5, "mode": "fast", "opt": True, "d": 3,
                                     "nested": {"x": 1}}


# Coalescing ------------------------------------------------------------------------------


def test_coalesce_merges_only_adjacent_deltas_of_one_kind_and_one_call() -> None:
    ref = StreamRef.of("a")
    items: list[OutItem] = [
        Reasoning(ref, 0, "think"), Reasoning(ref, 1, "ing"), Token(ref, 2, "Hi"),
        ToolCallFragment(ref, 3, ToolCallDelta(0, "c0", "f"), ""), ToolCallFragment(ref, 4, ToolCallDelta(0), "{\""),
        ToolCallFragment(ref, 5, ToolCallDelta(1, "c1", "g"), "{"), ToolCallFragment(ref, 6, ToolCallDelta(0), "a"),
        ToolCallFragment(ref, 7, ToolCallDelta(0), "\"}"), Token(ref, 8, "!"),
    ]
    frames = [json.loads(f) for f in coalesce(items).frames]
    assert frames == [
        {"type": "reasoning", "id": "a", "seq": 1, "text": "thinking"},
        {"type": "token", "id": "a", "seq": 2, "text": "Hi"},
        {"type": "tool_call", "id": "a", "seq": 4, "index": 0, "call_id": "c0", "name": "f", "arguments": "{\""},
        {"type": "tool_call", "id": "a", "seq": 5, "index": 1, "call_id": "c1", "name": "g", "arguments": "{"},
        {"type": "tool_call", "id": "a", "seq": 7, "index": 0, "arguments": "a\"}"},
        {"type": "token", "id": "a", "seq": 8, "text": "!"},
    ]
    assert coalesce(items).merged_frames == 3


KINDS = st.sampled_from(["t", "r", 0, 1])


@given(st.lists(st.tuples(KINDS, st.text(max_size=3)), min_size=1, max_size=40))
def test_coalesce_keeps_every_kind_in_order(deltas: list[tuple[object, str]]) -> None:
    ref = StreamRef.of("s")
    items: list[Any] = []
    opened: set[object] = set()
    for seq, (kind, text) in enumerate(deltas):
        if kind == "t":
            items.append(Token(ref, seq, text))
        elif kind == "r":
            items.append(Reasoning(ref, seq, text))
        else:
            assert isinstance(kind, int)
            head = kind not in opened
            opened.add(kind)
            items.append(ToolCallFragment(ref, seq, ToolCallDelta(kind, f"c{kind}" if head else None), text))
    frames = [json.loads(f) for f in coalesce(items).frames]
    # Expanding each frame back to its kind gives the kinds in the order produced.
    runs: list[tuple[object, str]] = []
    for frame in frames:
        kind = {"token": "t", "reasoning": "r"}.get(frame["type"], frame.get("index"))
        runs.append((kind, frame.get("text", frame.get("arguments"))))
    assert "".join(t for _, t in runs) == "".join(t for _, t in deltas)
    assert [k for k, _ in runs] == [k for k, _ in _runs_of(deltas)]
    assert [f["seq"] for f in frames] == sorted({f["seq"] for f in frames})


def _runs_of(deltas: list[tuple[object, str]]) -> list[tuple[object, str]]:
    """The runs coalescing may form: a new run at each change of kind (or index), and at a
    call's first fragment."""
    runs: list[tuple[object, str]] = []
    opened: set[object] = set()
    for kind, text in deltas:
        head = isinstance(kind, int) and kind not in opened
        opened.add(kind)
        if runs and runs[-1][0] == kind and not head:
            runs[-1] = (kind, runs[-1][1] + text)
        else:
            runs.append((kind, text))
    return runs


def test_settings_default_to_a_message_size_that_fits_an_image() -> None:
    assert make_settings().max_message_bytes == 1 << 20
