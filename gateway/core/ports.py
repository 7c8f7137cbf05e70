"""The ports between the layers: what each side needs of the other, as Protocols, so
that no module imports the one that implements what it uses.

- ``Transport``: what a connection may do to its socket beyond ASGI; the uvicorn adapter
  (``gateway.transport.uvicorn``) implements it and puts it in the ASGI scope under
  ``TRANSPORT_EXTENSION``.
- ``Follower``: what a generation needs of a connection that follows it.
- ``Member``: what the hub needs of a connection it holds.
- ``Drains``: what the server's shutdown needs of the hub.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from gateway.wire.coalesce import OutItem

TRANSPORT_EXTENSION = "gateway.transport"


class Transport(Protocol):
    @property
    def last_inbound(self) -> float:
        """Event-loop time of the last bytes received from the client."""

    @property
    def write_backlog(self) -> int:
        """Bytes written but not yet taken by the socket (the transport's own buffer)."""

    def send_texts(self, texts: list[str]) -> bool:
        """Write text frames now, in one write, if the socket takes data without waiting.
        False, with nothing written, when it would wait, is closing or is gone."""

    def force_close(self, code: int, reason: str = "") -> None:
        """Queue a close frame without waiting for the send buffer, then close the socket."""


class Follower(Protocol):
    def send_now(self, item: OutItem) -> bool:
        """Write ``item`` at once if that keeps the order; False, with nothing written, when
        it must be queued instead (then ``send``)."""

    async def send(self, item: OutItem) -> None:
        """Queue ``item``; waits while the send queue is full (backpressure). Raises
        ``anyio.ClosedResourceError`` once the connection is closing."""

    def send_urgent(self, item: OutItem) -> None:
        """Queue ``item`` without waiting: a follower that must not hold the producer back."""

    def stop_waiting(self) -> None:
        """A producer waiting in ``send`` for room stops waiting (its item goes in anyway)."""

    def follow_ended(self, follow: Any) -> None:
        """The generation delivered its terminal event to this follower."""


class Member(Protocol):
    session_id: str
    user: str

    def __hash__(self) -> int: ...

    def on_deadline(self, now: float) -> float | None:
        """The hub's timer: a deadline passed. Returns the next one, or None."""

    def send_urgent(self, item: OutItem) -> None:
        """A broadcast or a room event: never waits (see ``Follower.send_urgent``)."""

    def send_droppable(self, item: OutItem) -> bool:
        """Queue ``item`` if there is room now; False (dropped) when the connection is busy."""

    def shut_down(self) -> None:
        """The process drains: end remaining generations with ``shutting_down``, close 1001."""


class Drains(Protocol):
    async def drain(self, force_exit: Callable[[], bool] = ...) -> None:
        """Refuse new work, let running work finish within the drain timeout, close sockets."""
