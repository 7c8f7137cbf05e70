"""A wait that another task can end early, for the Redis parts' loops (the group commit's
interval, a follower waiting for the tail, the tailer waiting for keys)."""

from __future__ import annotations

import asyncio


class Wakeup:
    """``wait`` returns when ``wake`` is called or ``timeout_s`` has passed. A ``wake``
    while nobody waits does nothing. A bare future and a timer: cheap enough to run once
    per batch."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def wake(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, timeout_s: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._future = future = loop.create_future()
        timer = loop.call_later(timeout_s, self.wake) if timeout_s is not None else None
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            self._future = None
