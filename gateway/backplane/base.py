"""The backplane: control messages between gateway processes.

Messages are small JSON-able dicts with an ``op``:
- ``cancel`` {user, id}: the process running that generation cancels it;
- ``follow`` {user, id}: someone (on any process) follows this generation, so its owner
  must not cancel it as abandoned;
- ``broadcast`` {data, user?}: deliver to every socket, or to one user's sockets;
- ``room`` {room, frames}: frames for every member of a room (presence, room generations).

Delivery is at most once and unordered across publishers; from one publisher, messages
arrive in the order published. Every process receives its own messages too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

ControlMessage = dict[str, Any]
Handler = Callable[[ControlMessage], None]


class Backplane(Protocol):
    name: str

    async def start(self, handler: Handler) -> None:
        """Register the handler; it is called from the event loop and must not block."""

    async def run(self) -> None:
        """Receive messages until cancelled; a failing connection is retried inside."""

    async def publish(self, message: ControlMessage) -> None:
        """Send to every process. Raises when the backplane is unreachable."""

    async def aclose(self) -> None: ...
