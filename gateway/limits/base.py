"""Per-user limits: open connections, concurrent generations and the generate rate.

A granted slot is a ``Lease``; releasing it is the holder's job (in a ``finally``), and a
lease is released by the store that granted it, so a Redis store that fell back to local
limits during an outage still balances its books.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class Lease:
    __slots__ = ("_release", "released")

    def __init__(self, release: Callable[[], Awaitable[None]]) -> None:
        self._release = release
        self.released = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await self._release()


class LimitStore(Protocol):
    name: str

    async def add_connection(self, user: str) -> Lease | None:
        """A connection slot for ``user``, or None when the user is at the limit."""

    async def acquire_generation(self, user: str) -> Lease:
        """A generation slot, or raise ``too_many_streams`` / ``rate_limited``."""
