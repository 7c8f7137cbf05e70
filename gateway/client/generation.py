"""One answer as its caller sees it: an async iterator of its text, and its terminal frame."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from gateway.client.streams import Delivery, StreamState


class Generation:
    """One answer: an async iterator of text, plus ``result()`` for its terminal frame.

    The terminal frame is ``{"type":"done",…}`` or ``{"type":"error",…}``; the client adds
    the codes ``disconnected`` and ``stream_lost`` to the server's.
    """

    def __init__(self, state: StreamState, cancel: Callable[[str], Awaitable[None]]) -> None:
        self._cancel = cancel
        self._state = state
        self._chunks: deque[str] = deque()
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
    def terminal(self) -> dict[str, Any] | None:
        return self._state.terminal

    @property
    def finish_reason(self) -> str | None:
        terminal = self._state.terminal
        return str(terminal.get("finish_reason")) if terminal and terminal.get("type") == "done" else None

    @property
    def tokens(self) -> int:
        """Tokens received: the last ``seq`` plus one."""
        return self._state.last_seq + 1

    def _deliver(self, delivery: Delivery) -> None:
        if delivery.text is not None:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._chunks.append(delivery.text)
        if delivery.terminal is not None:
            self.finished_at = time.monotonic()
            self._finished.set()
        self._wakeup.set()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> str:
        while True:
            if self._chunks:
                return self._chunks.popleft()
            if self._finished.is_set():
                raise StopAsyncIteration
            await self._wakeup.wait()
            self._wakeup = anyio.Event()

    async def result(self) -> dict[str, Any]:
        """Wait for the terminal frame (without consuming the text)."""
        await self._finished.wait()
        assert self._state.terminal is not None
        return self._state.terminal

    async def cancel(self) -> None:
        await self._cancel(self.id)
