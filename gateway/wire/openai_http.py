"""The OpenAI-compatible HTTP API's side of the protocol: a Chat Completions request body
validated into a ``GenerateMessage`` (the same checks as a socket's ``generate``), and the
JSON it answers with: ``chat.completion`` objects, ``chat.completion.chunk`` server-sent
events, the model list, and errors in OpenAI's shape with their HTTP status.

Like the rest of ``gateway.wire`` it does no I/O: the async layer (``gateway.http``) reads
bodies and writes what this module encodes.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.wire.codes import ErrorCode
from gateway.wire.errors import FrameError
from gateway.wire.events import Done, Failed, ToolCallDelta, Usage
from gateway.wire.inbound import GenerateMessage, validate_generate

DONE_EVENT = b"data: [DONE]\n\n"
PING_EVENT = b": ping\n\n"

# An error code's HTTP status and OpenAI error type, when it refuses a request before
# its stream starts.
_STATUS: dict[str, tuple[int, str]] = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_TYPE: (400, "invalid_request_error"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error"),
    ErrorCode.FORBIDDEN: (403, "permission_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.DUPLICATE_ID: (409, "invalid_request_error"),
    ErrorCode.TOO_MANY_STREAMS: (429, "rate_limit_error"),
    ErrorCode.RATE_LIMITED: (429, "rate_limit_error"),
    ErrorCode.BACKEND_ERROR: (502, "server_error"),
    ErrorCode.BACKEND_TIMEOUT: (504, "server_error"),
    ErrorCode.SHUTTING_DOWN: (503, "server_error"),
    ErrorCode.UNAVAILABLE: (503, "server_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}
UNAUTHORIZED = "unauthorized"
_GENERATION_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


class ChatRequest:
    """A validated Chat Completions request: the generate message and the HTTP options."""

    __slots__ = ("include_usage", "message", "stream")

    def __init__(self, message: GenerateMessage, stream: bool, include_usage: bool) -> None:
        self.message = message
        self.stream = stream
        self.include_usage = include_usage


def _bad(message: str, param: str | None = None) -> FrameError:
    error = FrameError(message)
    error.extra["param"] = param
    return error


def parse_chat_request(body: bytes, generation_id: str | None) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body; ``generation_id`` is the
    ``X-Generation-Id`` header. Raises ``FrameError`` naming the field, never echoing the
    input. Unknown fields are ignored, as OpenAI's own clients send fields of their own."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _bad("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    n = data.get("n")
    if n is not None and n != 1:
        raise _bad("n: only 1 is supported", "n")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: must be a boolean", "stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options: must be {\"include_usage\": boolean}", "stream_options")
        include_usage = bool(options.get("include_usage", False))
    if "messages" not in data:
        raise _bad("messages: Field required", "messages")
    if data["messages"] is None:
        raise _bad("messages: Input should be a valid list", "messages")
    fields = {key: value for key, value in data.items() if key not in ("prompt", "room", "type", "id")}
    if data.get("max_completion_tokens") is not None:
        fields["max_tokens"] = data["max_completion_tokens"]
    if generation_id is not None:
        if not _GENERATION_ID.fullmatch(generation_id):
            raise _bad("x-generation-id: 1-64 of A-Z a-z 0-9 _ . : -", "x-generation-id")
        fields["id"] = generation_id
    try:
        message = validate_generate(fields)
    except FrameError as exc:
        raise _bad(exc.message, exc.message.split(":", 1)[0] if ":" in exc.message else None) from None
    return ChatRequest(message, bool(stream), include_usage)


def http_status(code: str) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of an error code."""
    if code == UNAUTHORIZED:
        return 401, "authentication_error"
    return _STATUS.get(code, (500, "server_error"))


def error_body(code: str, message: str, param: str | None = None) -> bytes:
    """``{"error": {"message", "type", "code", "param"}}``."""
    _, kind = http_status(code)
    return orjson.dumps({"error": {"message": message, "type": kind, "code": code, "param": param}})


def error_event(terminal: Failed) -> bytes:
    """The last event of a stream that failed after it started (no ``[DONE]`` follows)."""
    return b"data: " + error_body(terminal.code, terminal.message) + b"\n\n"


class ChunkEncoder:
    """The ``chat.completion.chunk`` events of one generation. Each delta's event carries
    its ``seq`` as the event id, so ``Last-Event-ID`` resumes right after it."""

    __slots__ = ("_head", "_tail")

    def __init__(self, generation_id: str, created: int, model: str) -> None:
        head = orjson.dumps({"id": generation_id, "object": "chat.completion.chunk", "created": created,
                             "model": model})
        self._head = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":'
        self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def _chunk(self, delta: dict[str, Any], seq: int | None = None) -> bytes:
        event = self._head + orjson.dumps(delta) + self._tail
        return event if seq is None else b"id: %d\n" % seq + event

    def role(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def text(self, seq: int, text: str) -> bytes:
        return self._chunk({"content": text}, seq)

    def reasoning(self, seq: int, text: str) -> bytes:
        return self._chunk({"reasoning_content": text}, seq)

    def tool_call(self, seq: int, call: ToolCallDelta, arguments: str) -> bytes:
        fragment: dict[str, Any] = {"index": call.index}
        function: dict[str, Any] = {"arguments": arguments}
        if call.call_id is not None:
            fragment["id"] = call.call_id
            fragment["type"] = "function"
        if call.name is not None:
            function["name"] = call.name
        fragment["function"] = function
        return self._chunk({"tool_calls": [fragment]}, seq)

    def finish(self, finish_reason: str) -> bytes:
        head = self._head
        return head + b'{},"logprobs":null,"finish_reason":' + orjson.dumps(finish_reason) + b"}]}\n\n"

    def usage(self, usage: Usage) -> bytes:
        head = self._head.removesuffix(b'[{"index":0,"delta":')
        return head + b"[]," + b'"usage":' + orjson.dumps(usage_object(usage)) + b"}\n\n"


def usage_object(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                            "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if usage.reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    if usage.cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return body


def completion_body(generation_id: str, created: int, model: str, content: str, reasoning: str,
                    tool_calls: list[dict[str, Any]], terminal: Done) -> bytes:
    """A finished generation as a ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not tool_calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return orjson.dumps({
        "id": generation_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": terminal.finish_reason}],
        "usage": usage_object(terminal.usage),
    })


def models_body(models: list[str], created: int) -> bytes:
    """``GET /v1/models``: OpenAI's list shape."""
    return orjson.dumps({"object": "list", "data": [
        {"id": model, "object": "model", "created": created, "owned_by": "gateway"} for model in models]})

