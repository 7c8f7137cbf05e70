"""One HTTP response following one generation: ``ResponseSink`` is the generation's
``Follower`` (a bounded queue its response reads), and ``EventStream`` the ASGI response
that writes server-sent events until the stream ends or the client goes away.

Backpressure is the socket's: a response whose client reads slowly fills its queue and
the producer waits (``send``), which pauses the backend. The client's disconnect closes
the sink, so a producer waiting on it stops waiting and detaches, as for a dropped socket.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
from starlette.responses import Response

from gateway.wire.coalesce import OutItem

logger = logging.getLogger("gateway.http")


class ResponseSink:
    """A ``Follower`` for an HTTP response. Holds up to ``limit`` items for ``send``;
    ``send_urgent`` (a resume's replay, a second follower's copy) never waits."""

    __slots__ = ("_items", "_limit", "_readable", "_room", "_stop", "closed", "ended")

    def __init__(self, limit: int) -> None:
        self._items: deque[OutItem] = deque()
        self._limit = limit
        self._readable = anyio.Event()
        self._room = anyio.Event()
        self._stop = False
        self.closed = False
        self.ended = False

    def send_now(self, item: OutItem) -> bool:
        if self.closed or len(self._items) >= self._limit:
            return False
        self._items.append(item)
        self._readable.set()
        return True

    async def send(self, item: OutItem) -> None:
        while not self.closed and len(self._items) >= self._limit and not self._stop:
            if self._room.is_set():
                self._room = anyio.Event()
            await self._room.wait()
        self._stop = False
        if self.closed:
            raise anyio.ClosedResourceError
        self._items.append(item)
        self._readable.set()

    def send_urgent(self, item: OutItem) -> None:
        if not self.closed:
            self._items.append(item)
            self._readable.set()

    def extend(self, items: list[OutItem]) -> None:
        if not self.closed:
            self._items.extend(items)
            self._readable.set()

    def stop_waiting(self) -> None:
        self._stop = True
        self._room.set()

    def follow_ended(self, follow: Any) -> None:
        self.ended = True
        self._readable.set()

    def close(self) -> None:
        self.closed = True
        self._items.clear()
        self._room.set()
        self._readable.set()

    async def take(self, wait_s: float | None) -> list[OutItem]:
        """Everything waiting, after waiting up to ``wait_s`` for something; [] when
        nothing came in time."""
        if not self._items:
            if self._readable.is_set():
                self._readable = anyio.Event()
            if wait_s is None:
                await self._readable.wait()
            else:
                with anyio.move_on_after(wait_s):
                    await self._readable.wait()
        items = list(self._items)
        self._items.clear()
        self._room.set()
        return items


class EventStream(Response):
    """An ASGI ``text/event-stream`` response. ``events`` yields the bytes to write;
    ``on_close`` runs exactly once however the response ends (the stream's end, the
    client's disconnect, the server's shutdown); ``background``, when given, runs for as
    long as the response (a relay that feeds ``events``)."""

    def __init__(self, headers: dict[str, str], events: AsyncIterator[bytes], on_close: Callable[[], None],
                 background: Callable[[], Coroutine[Any, Any, None]] | None = None, *,
                 write_timeout_s: float = 10.0) -> None:
        super().__init__(status_code=200)
        self.write_timeout_s = write_timeout_s
        self.extra_headers = headers
        self.events = events
        self.on_close = on_close
        self.feed = background

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        headers += [(name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in self.extra_headers.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with anyio.create_task_group() as task_group:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    task_group.cancel_scope.cancel()

                task_group.start_soon(watch_disconnect)
                if self.feed is not None:
                    task_group.start_soon(self.feed)
                async with contextlib.aclosing(self.events) as events:  # type: ignore[type-var]
                    async for chunk in events:
                        with anyio.move_on_after(self.write_timeout_s) as write:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        if write.cancelled_caught:
                            # A client that stops reading is a slow consumer, as on the
                            # socket: the response ends; the generation is detached.
                            logger.info("HTTP stream closed: the client stopped reading")
                            task_group.cancel_scope.cancel()
                            return
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                task_group.cancel_scope.cancel()
        except OSError:
            pass  # the client went away while a write was in flight
        finally:
            self.on_close()
