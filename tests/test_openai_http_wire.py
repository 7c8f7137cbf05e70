"""The HTTP API's side of the wire, with no I/O: a Chat Completions body becomes the same
``GenerateMessage`` a socket's ``generate`` does, or a ``FrameError`` naming the field; the
chunks, the completion and the errors have OpenAI's shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.wire.errors import FrameError
from gateway.wire.events import Done, Failed, ToolCallDelta, Usage
from gateway.wire.openai_http import (
    ChunkEncoder,
    completion_body,
    error_body,
    error_event,
    http_status,
    parse_chat_request,
)

HELLO = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": HELLO, **fields}).encode()


def data(event: bytes) -> tuple[str | None, dict[str, Any]]:
    lines = event.decode().removesuffix("\n\n").split("\n")
    event_id = lines[0][4:] if lines[0].startswith("id: ") else None
    return event_id, json.loads(lines[-1].removeprefix("data: "))


def test_the_body_is_a_generate_message() -> None:
    chat = parse_chat_request(body(stream=True, stream_options={"include_usage": True}, max_completion_tokens=7,
                                   max_tokens=99, temperature=1, seed=3, user="ignored", logprobs=False), "mine-1")
    message = chat.message
    assert (chat.stream, chat.include_usage) == (True, True)
    assert (message.id, message.max_tokens, message.temperature, message.seed) == ("mine-1", 7, 1, 3)
    assert message.model == "m"
    assert message.messages is not None and message.messages[0].content == "hi"
    plain = parse_chat_request(body(), None)
    assert (plain.stream, plain.include_usage, plain.message.id) == (False, False, None)


@pytest.mark.parametrize(("raw", "message", "param"), [
    (b"nope", "the body must be a JSON object", None),
    (b"[]", "the body must be a JSON object", None),
    (json.dumps({"model": "m"}).encode(), "messages: Field required", "messages"),
    (body(n=3), "n: only 1 is supported", "n"),
    (body(stream="yes"), "stream: must be a boolean", "stream"),
    (body(stream_options={"include_usage": "yes"}), 'stream_options: must be {"include_usage": boolean}',
     "stream_options"),
    (body(temperature=9), "temperature: Input should be less than or equal to 2", "temperature"),
    (body(tool_choice="required"), "tool_choice: needs tools", "tool_choice"),
    (body(prompt="a prompt, not messages", messages=None), "messages: Input should be a valid list", "messages"),
])
def test_a_bad_body_names_the_field(raw: bytes, message: str, param: str | None) -> None:
    with pytest.raises(FrameError) as refused:
        parse_chat_request(raw, None)
    assert refused.value.message == message
    assert refused.value.extra["param"] == param


def test_a_bad_generation_id_header_is_refused() -> None:
    with pytest.raises(FrameError) as refused:
        parse_chat_request(body(), "has space")
    assert refused.value.extra["param"] == "x-generation-id"


def test_chunks_have_openais_shape_and_seq_ids() -> None:
    encoder = ChunkEncoder("g-1", 1700000000, "m")
    role_id, role = data(encoder.role())
    assert role_id is None
    assert role == {"id": "g-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}
    assert data(encoder.text(4, "hé"))[0] == "4"
    assert data(encoder.text(4, "hé"))[1]["choices"][0]["delta"] == {"content": "hé"}
    assert data(encoder.reasoning(5, "so"))[1]["choices"][0]["delta"] == {"reasoning_content": "so"}
    first = data(encoder.tool_call(6, ToolCallDelta(1, "call_a", "f"), ""))[1]["choices"][0]["delta"]
    assert first == {"tool_calls": [{"index": 1, "id": "call_a", "type": "function",
                                     "function": {"arguments": "", "name": "f"}}]}
    rest = data(encoder.tool_call(7, ToolCallDelta(1), '{"a":1}'))[1]["choices"][0]["delta"]
    assert rest == {"tool_calls": [{"index": 1, "function": {"arguments": '{"a":1}'}}]}
    finish_id, finish = data(encoder.finish("tool_calls"))
    assert finish_id is None and finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                         "finish_reason": "tool_calls"}
    _, usage = data(encoder.usage(Usage(3, 4, reasoning_tokens=1, cached_tokens=2)))
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
        "completion_tokens_details": {"reasoning_tokens": 1}, "prompt_tokens_details": {"cached_tokens": 2}}


def test_a_completion_and_errors() -> None:
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    completion = json.loads(completion_body("g-1", 1, "m", "", "thought", calls, Done("tool_calls", Usage(1, 2))))
    message = completion["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "reasoning_content": "thought", "tool_calls": calls}
    assert completion["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert json.loads(error_body("not_found", "no generation with this id")) == {"error": {
        "message": "no generation with this id", "type": "not_found_error", "code": "not_found", "param": None}}
    assert error_event(Failed("backend_error", "upstream failed")).startswith(b'data: {"error":')
    assert [http_status(code)[0] for code in ("bad_request", "unauthorized", "forbidden", "not_found",
                                              "duplicate_id", "rate_limited", "too_many_streams", "shutting_down",
                                              "unavailable", "backend_error", "internal", "something new")] == [
        400, 401, 403, 404, 409, 429, 429, 503, 503, 502, 500, 500]
