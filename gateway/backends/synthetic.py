"""``synthetic``: an LLM stand-in for load tests.

Exactly ``max_tokens`` tokens of deterministic text (the text depends only on the prompt
and ``max_tokens``), the first after ``GATEWAY_SYNTHETIC_TTFT_MS``, then paced at
``GATEWAY_SYNTHETIC_TOKENS_PER_S`` against a fixed schedule, so a slow consumer does not
make the backend drift; 0 means as fast as possible.

Given ``tools`` (and a ``tool_choice`` other than ``none``, and a conversation that does not
end with a tool's result), it calls the first tool instead (or the one ``tool_choice``
names): one call, with arguments built from the tool's parameter schema, streamed in
fragments at the same pace, ending with ``tool_calls``. Load tests and demos exercise tool
calls with no upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from config import Settings
from gateway.backends.base import (
    SEED,
    TOOLS,
    BackendSettings,
    Chunk,
    FinishChunk,
    GenerationRequest,
    TokenChunk,
    Tool,
    ToolCallChunk,
)

VOCABULARY = (
    "the model streams tokens over a socket while clients read them as fast as they can and every gateway "
    "keeps its queues bounded so that memory stays flat under load with heartbeats and backpressure working "
    "together quietly in the background of each connection"
).split()

# At full speed, yield to the event loop every this many tokens so other connections run.
_YIELD_EVERY = 32


def iter_synthetic_tokens(prompt: str, count: int) -> Iterator[str]:
    """The deterministic token sequence for ``prompt`` and ``count``, generated lazily so a
    request for millions of tokens costs no memory up front."""
    seed = int.from_bytes(hashlib.blake2b(f"{count}:{prompt}".encode(), digest_size=8).digest(), "big")
    state = seed or 1
    vocabulary = VOCABULARY
    size = len(vocabulary)
    for index in range(count):
        # xorshift64: cheap, deterministic, platform independent.
        state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 7
        state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
        word = vocabulary[state % size]
        yield word if index == 0 else " " + word


def synthetic_tokens(prompt: str, count: int) -> list[str]:
    return list(iter_synthetic_tokens(prompt, count))


# Characters of arguments per tool-call fragment: about what a model's token carries.
ARGUMENT_FRAGMENT_CHARS = 4
# How deep a parameter schema is followed; deeper objects become {}.
SCHEMA_DEPTH = 8


def example_value(schema: Any, depth: int = 0) -> Any:
    """A value that fits a JSON Schema, the same every time: the first of an ``enum``, the
    ``default``, else one per ``type`` (objects get every property)."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        options = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(options, list) and options:
            return example_value(options[0], depth)
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        properties = schema.get("properties")
        if depth >= SCHEMA_DEPTH or not isinstance(properties, dict):
            return {}
        return {str(name): example_value(sub, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return [example_value(schema.get("items"), depth + 1)] if depth < SCHEMA_DEPTH else []
    return {"string": "synthetic", "integer": 1, "number": 1.5, "boolean": True}.get(str(kind))


def synthetic_tool_call(request: GenerationRequest) -> tuple[Tool, str, str] | None:
    """The tool to call, the call's id and its arguments (JSON), or None for a text answer."""
    if not request.tools or request.tool_choice == "none":
        return None
    if request.messages and request.messages[-1].role == "tool":
        return None  # the tool answered: the model now answers in text
    wanted = request.tool_choice_function
    tool = next((t for t in request.tools if t.name == wanted), request.tools[0])
    arguments = json.dumps(example_value(tool.parameters or {"type": "object"}), separators=(",", ":"))
    digest = hashlib.blake2b(f"{request.id}:{tool.name}".encode(), digest_size=6).hexdigest()
    return tool, "call_" + digest, arguments


class SyntheticSettings(BackendSettings):
    """``GATEWAY_SYNTHETIC_*``."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_SYNTHETIC_")

    # Time to the first token.
    ttft_ms: float = Field(default=200.0, ge=0)
    # Tokens per second after the first; 0: as fast as possible.
    tokens_per_s: float = Field(default=50.0, ge=0)


class SyntheticBackend:
    name = "synthetic"
    settings_model: ClassVar[type[BackendSettings]] = SyntheticSettings
    # Its text is the same for any seed, which it thereby honours.
    features = frozenset({TOOLS, SEED})

    def __init__(self, settings: Settings) -> None:
        own = settings.backend_settings_as(SyntheticSettings)
        self.ttft_s = own.ttft_ms / 1000.0
        self.tokens_per_s = own.tokens_per_s

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def ready(self) -> bool:
        return True

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        # The gateway runs on asyncio (uvicorn); its sleep and clock are used directly,
        # without anyio's dispatch, because this is the per-token path of every load test.
        clock = asyncio.get_running_loop().time
        prompt = request.last_user_text()
        started = clock()
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        interval = 1.0 / self.tokens_per_s if self.tokens_per_s else 0.0
        first_at = started + self.ttft_s
        call = synthetic_tool_call(request)
        if call is None:
            pieces: Iterator[Chunk] = map(TokenChunk, iter_synthetic_tokens(prompt, request.max_tokens))
        else:
            pieces = _call_fragments(*call)
        sent = 0
        cut = False
        # Tokens given without yielding to the event loop in between. A paced stream that
        # fell behind its schedule (the loop was busy) emits what is due at once, as a real
        # upstream's buffered chunks arrive, yielding only every _YIELD_EVERY tokens: a
        # yield per late token would add a loop pass to each just when the loop is behind.
        unyielded = 0
        for index, chunk in enumerate(pieces):
            if index >= request.max_tokens:
                cut = True
                break
            if interval:
                delay = first_at + index * interval - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                    unyielded = 0
                elif unyielded >= _YIELD_EVERY:
                    await asyncio.sleep(0)
                    unyielded = 0
                else:
                    unyielded += 1
            elif index % _YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
            yield chunk
            sent += 1
        reason = "tool_calls" if call is not None and not cut else "length"
        yield FinishChunk(reason, prompt_tokens=len(prompt.split()), completion_tokens=sent)


def _call_fragments(tool: Tool, call_id: str, arguments: str) -> Iterator[Chunk]:
    """The call as a model streams it: the id and the name first, then the arguments."""
    yield ToolCallChunk(0, "", call_id, tool.name)
    for start in range(0, len(arguments), ARGUMENT_FRAGMENT_CHARS):
        yield ToolCallChunk(0, arguments[start:start + ARGUMENT_FRAGMENT_CHARS])
