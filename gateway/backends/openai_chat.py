"""The Chat Completions shapes of the ``openai`` backend: a conversation turn and the tool
fields as the upstream takes them, and one streamed event as chunks (answer text,
reasoning, tool-call fragments) plus the usage it reports.

Upstreams differ in small ways, all handled here: reasoning comes as ``reasoning_content``
(vLLM, DeepSeek) or ``reasoning`` (Ollama, OpenRouter); a tool call may arrive whole in one
event (Ollama) or spread over many (OpenAI, vLLM), and some upstreams repeat its id on every
fragment. Out of here, a call's id and name come once, on its first fragment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.backends.base import (
    ChatTurn,
    Chunk,
    GenerationRequest,
    ImagePart,
    ReasoningChunk,
    TextPart,
    TokenChunk,
    ToolCallChunk,
)
from gateway.backends.upstream import error_text, sanitize
from gateway.wire.errors import BackendError


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None

    def update(self, reported: dict[str, Any]) -> None:
        """From an upstream's ``usage`` object; what it lacks stays as it was."""
        self.prompt_tokens = _count(reported.get("prompt_tokens"), self.prompt_tokens)
        self.completion_tokens = _count(reported.get("completion_tokens"), self.completion_tokens)
        details = reported.get("completion_tokens_details")
        if isinstance(details, dict):
            self.reasoning_tokens = _count(details.get("reasoning_tokens"), self.reasoning_tokens)
        details = reported.get("prompt_tokens_details")
        if isinstance(details, dict):
            self.cached_tokens = _count(details.get("cached_tokens"), self.cached_tokens)


def _count(value: object, otherwise: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else otherwise


def message(turn: ChatTurn) -> dict[str, Any]:
    """A conversation turn in the Chat Completions shape."""
    content = turn.content
    message: dict[str, Any] = {"role": turn.role}
    if content is None or isinstance(content, str):
        message["content"] = content
    else:
        message["content"] = [
            {"type": "text", "text": part.text} if isinstance(part, TextPart)
            else {"type": "image_url", "image_url": _image_url(part)}
            for part in content
        ]
    if turn.tool_calls:
        message["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}
                                 for call in turn.tool_calls]
    if turn.tool_call_id is not None:
        message["tool_call_id"] = turn.tool_call_id
    return message


def _image_url(part: ImagePart) -> dict[str, str]:
    return {"url": part.url, "detail": part.detail} if part.detail else {"url": part.url}


def tool_fields(request: GenerationRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if request.tools:
        fields["tools"] = [
            {"type": "function", "function": {key: value for key, value in (
                ("name", tool.name), ("description", tool.description), ("parameters", tool.parameters),
                ("strict", tool.strict)) if value is not None}}
            for tool in request.tools
        ]
    if request.tool_choice_function is not None:
        fields["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice_function}}
    elif request.tool_choice is not None:
        fields["tool_choice"] = request.tool_choice
    if request.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    return fields


def parse_event(data: str, usage: Usage, calls: dict[int, str | None], secrets: tuple[str, ...]
                ) -> tuple[list[Chunk], str | None]:
    """The chunks and the finish reason in one event; updates ``usage``, and ``calls``,
    the tool calls opened so far (index to id)."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BackendError("the upstream sent a malformed event") from None
    if not isinstance(payload, dict):
        raise BackendError("the upstream sent a malformed event")
    if payload.get("error") is not None:
        detail = sanitize(error_text(json.dumps(payload)), secrets)
        raise BackendError("the upstream failed mid-stream" + (f": {detail}" if detail else ""))
    reported = payload.get("usage")
    if isinstance(reported, dict):
        usage.update(reported)
    choices = payload.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise BackendError("the upstream sent a malformed event")
    chunks: list[Chunk] = []
    reason: str | None = None
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        if "delta" in choice:
            delta = choice["delta"]
            if isinstance(delta, dict):
                _delta_chunks(delta, chunks, calls)
            elif delta is not None:
                raise BackendError("the upstream sent a malformed event")
        else:
            text = choice.get("text")
            if text is not None and not isinstance(text, str):
                raise BackendError("the upstream sent a malformed event")
            if text:
                chunks.append(TokenChunk(text))
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            reason = finish
    return chunks, reason


def _text_field(delta: dict[str, Any], *names: str, strict: bool = True) -> str | None:
    """The first of ``names`` that holds a non-empty string; another type is malformed
    when ``strict``, else skipped (fields that upstreams disagree on)."""
    for name in names:
        value = delta.get(name)
        if value is not None and not isinstance(value, str):
            if not strict:
                continue
            raise BackendError("the upstream sent a malformed event")
        if value:
            return value
    return None


def _delta_chunks(delta: dict[str, Any], chunks: list[Chunk], calls: dict[int, str | None]) -> None:
    """One Chat Completions delta as chunks: reasoning first (``reasoning_content``, as
    vLLM and DeepSeek send it, or ``reasoning``, as Ollama and OpenRouter do), then
    content, then tool-call fragments. A call's id and name go out with the first fragment
    of its index only, whatever the upstream repeats. ``calls`` maps the index of each call
    opened so far to its id."""
    reasoning = _text_field(delta, "reasoning_content", "reasoning", strict=False)
    if reasoning:
        chunks.append(ReasoningChunk(reasoning))
    content = _text_field(delta, "content")
    if content:
        chunks.append(TokenChunk(content))
    tool_calls = delta.get("tool_calls")
    if tool_calls is None:
        return
    if not isinstance(tool_calls, list):
        raise BackendError("the upstream sent a malformed event")
    for position, call in enumerate(tool_calls):
        if not isinstance(call, dict):
            raise BackendError("the upstream sent a malformed event")
        call_id = call.get("id")
        index = call.get("index")
        if index is None:  # some upstreams number no call: a new id is a new call
            opened = list(calls)
            known = call_id is None or call_id in calls.values()
            index = opened[-1] if known and opened else (max(opened) + 1 if opened else position)
        function = call.get("function") or {}
        if not isinstance(index, int) or isinstance(index, bool) or index < 0 or not isinstance(function, dict):
            raise BackendError("the upstream sent a malformed event")
        arguments = _text_field(function, "arguments") or ""
        if index in calls:
            if arguments:
                chunks.append(ToolCallChunk(index, arguments))
            continue
        name = _text_field(function, "name")
        if call_id is not None and not isinstance(call_id, str):
            raise BackendError("the upstream sent a malformed event")
        if call_id or name or arguments:
            calls[index] = call_id
            chunks.append(ToolCallChunk(index, arguments, call_id or None, name))
