"""In-process backplane: one process is the whole cluster."""

from __future__ import annotations

import anyio

from gateway.backplane.base import ControlMessage, Handler


class MemoryBackplane:
    name = "memory"

    def __init__(self) -> None:
        self._handler: Handler | None = None

    async def start(self, handler: Handler) -> None:
        self._handler = handler

    async def run(self) -> None:
        await anyio.sleep_forever()

    async def publish(self, message: ControlMessage) -> None:
        if self._handler is not None:
            self._handler(message)

    async def aclose(self) -> None:
        self._handler = None
