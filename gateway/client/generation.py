"""One answer as its caller sees it: an async iterator of its text, its typed parts (text,
reasoning, tool-call fragments), the assembled tool calls, and its terminal frame."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

from gateway.client.streams import Delivery, StreamState
from gateway.client.types import Part, TextPart


class Generation:
    """One answer: an async iterator of its text, ``parts()`` for every part typed, and
    ``result()`` for its terminal frame.

    The terminal frame is ``{"type":"done",…}`` or ``{"type":"error",…}``; the client adds
    the codes ``disconnected`` and ``stream_lost`` to the server's, and to a ``done`` frame
    the assembled ``tool_calls`` when the model made any. Iterating the text and the parts
    are independent: each iterator sees every part from the start.
    """

    def __init__(self, state: StreamState, cancel: Callable[[str], Awaitable[None]]) -> None:
        self._cancel = cancel
        self._state = state
        self._parts: list[Part] = []
        self._text_cursor = 0
        self._wakeup = anyio.Event()
        self._finished = anyio.Event()
        self.created_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def id(self) -> str:
        return self._state.id

    @property
    def epoch(self) -> str | None:
        return self._state.epoch

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self._state.texts)

    @property
    def reasoning(self) -> str:
        """The model's reasoning received so far."""
        return "".join(self._state.reasoning)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls so far, assembled: ``[{"id", "type": "function", "function":
        {"name", "arguments"}}]``, the shape an assistant message sends them back in."""
        return self._state.assembled_tool_calls()

    @property
    def terminal(self) -> dict[str, Any] | None:
        return self._state.terminal

    @property
    def finish_reason(self) -> str | None:
        terminal = self._state.terminal
        return str(terminal.get("finish_reason")) if terminal and terminal.get("type") == "done" else None

    @property
    def tokens(self) -> int:
        """Deltas received, of every kind: the last ``seq`` plus one."""
        return self._state.last_seq + 1

    def _deliver(self, delivery: Delivery) -> None:
        if delivery.part is not None:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._parts.append(delivery.part)
        if delivery.terminal is not None:
            self.finished_at = time.monotonic()
            self._finished.set()
        wakeup, self._wakeup = self._wakeup, anyio.Event()
        wakeup.set()

    async def _next_part(self, cursor: int) -> Part | None:
        """The part at ``cursor`` once it arrived; None after the last one."""
        while cursor >= len(self._parts):
            if self._finished.is_set():
                return None
            await self._wakeup.wait()
        return self._parts[cursor]

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> str:
        """The answer's text, piece by piece (other parts are skipped: see ``parts``)."""
        while True:
            part = await self._next_part(self._text_cursor)
            if part is None:
                raise StopAsyncIteration
            self._text_cursor += 1
            if isinstance(part, TextPart):
                return part.text

    async def parts(self) -> AsyncIterator[Part]:
        """Every part as it arrives, typed: ``TextPart``, ``ReasoningPart``, and
        ``ToolCallPart`` (a fragment; ``tool_calls`` has them assembled), each with its
        ``kind``: ``"text"``, ``"reasoning"`` or ``"tool_call"``."""
        cursor = 0
        while (part := await self._next_part(cursor)) is not None:
            cursor += 1
            yield part

    async def result(self) -> dict[str, Any]:
        """Wait for the terminal frame (without consuming the text)."""
        await self._finished.wait()
        assert self._state.terminal is not None
        return self._state.terminal

    async def cancel(self) -> None:
        await self._cancel(self.id)
