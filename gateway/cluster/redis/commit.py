"""Group commit: the writes that every generation of this process makes within one flush
interval reach Redis in one pipeline, one round trip, instead of one round trip each.

There is no background task. The first writer that finds no commit under way leads: it
waits out the rest of the interval (an urgent write cuts the wait short), takes everything
pending, executes it and wakes the writers it carried. Writers that came in meanwhile wait
for the next commit; when the leader is done it hands the lead to the first of them. So a
commit always has an owner that is awaiting it, and a cancelled leader fails the writes it
carried (their callers retry) and still hands over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

from gateway.cluster.redis.wakeup import Wakeup

W = TypeVar("W")

_COMMITTED: Final = "committed"
_LEAD: Final = "lead"


class CommitInterrupted(RuntimeError):
    """The commit carrying a write stopped before Redis answered; write it again."""


class _Pending(Generic[W]):
    __slots__ = ("outcome", "urgent", "write")

    def __init__(self, write: W, urgent: bool, outcome: asyncio.Future[str]) -> None:
        self.write = write
        self.urgent = urgent
        self.outcome = outcome


class GroupCommit(Generic[W]):
    """Writes submitted within one ``interval_s`` go to ``execute`` together, in order of
    submission. ``submit`` returns once its write is committed and raises what the commit
    raised. Commits start at least ``interval_s`` apart unless a write is urgent."""

    def __init__(self, execute: Callable[[list[W]], Awaitable[None]], interval_s: float) -> None:
        self._execute = execute
        self.interval_s = interval_s
        self._pending: list[_Pending[W]] = []
        self._leading = False
        self._last_start = -float("inf")
        self._gap = Wakeup()
        # Counters for tests and benchmarks: commits made, writes carried.
        self.commits = 0
        self.writes = 0

    async def submit(self, write: W, *, urgent: bool = False) -> None:
        loop = asyncio.get_running_loop()
        entry = _Pending(write, urgent, loop.create_future())
        self._pending.append(entry)
        if urgent:
            self._gap.wake()
        if self._leading:
            try:
                role = await entry.outcome
            except asyncio.CancelledError:
                # Handed the lead just as this writer was cancelled: pass it on.
                if entry.outcome.done() and not entry.outcome.cancelled() and entry.outcome.result() == _LEAD:
                    self._hand_over()
                raise
            if role == _COMMITTED:
                return
        else:
            # Marked done, so that a hand-over never picks the leader's own entry.
            entry.outcome.set_result(_LEAD)
        self._leading = True
        try:
            await self._lead(entry)
        finally:
            self._hand_over()

    async def _lead(self, own: _Pending[W]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._last_start + self.interval_s - loop.time()
            if wait > 0 and not any(entry.urgent for entry in self._pending):
                await self._gap.wait(wait)
            batch, self._pending = self._pending, []
            self._last_start = loop.time()
            try:
                await self._execute([entry.write for entry in batch])
            except BaseException as exc:
                error = exc if isinstance(exc, Exception) else CommitInterrupted("the commit was interrupted")
                for entry in batch:
                    if entry is not own and not entry.outcome.done():
                        entry.outcome.set_exception(error)
                raise
            self.commits += 1
            self.writes += len(batch)
            carried_own = False
            for entry in batch:
                if entry is own:
                    carried_own = True
                elif not entry.outcome.done():
                    entry.outcome.set_result(_COMMITTED)
            if carried_own:
                return

    def _hand_over(self) -> None:
        """The lead goes to the first pending writer still waiting; with none, it lapses."""
        for entry in self._pending:
            if not entry.outcome.done():
                entry.outcome.set_result(_LEAD)
                return
        # Writers whose callers went away (cancelled) stay pending: the next commit carries them.
        self._leading = False

