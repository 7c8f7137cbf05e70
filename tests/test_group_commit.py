"""The group commit's guarantees, with an injected ``execute``: writes of one interval share
one commit in submission order, commits keep their distance unless a write is urgent,
failures reach every writer carried, and a leader that goes away never stalls the rest."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from gateway.cluster.redis.commit import CommitInterrupted, GroupCommit

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started: list[float] = []
        self.fail_next: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, writes: list[str]) -> None:
        self.started.append(asyncio.get_running_loop().time())
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.batches.append(list(writes))


async def test_writes_of_one_interval_share_one_commit_in_submission_order() -> None:
    recorder = Recorder()
    commit: GroupCommit[str] = GroupCommit(recorder, 0.05)
    async with anyio.create_task_group() as tg:
        for index in range(100):
            tg.start_soon(commit.submit, f"w{index}")
    # The first writer leads at once (no commit before it); the 99 that came while it
    # committed share the next commit.
    assert [len(batch) for batch in recorder.batches] == [1, 99]
    assert [w for batch in recorder.batches for w in batch] == [f"w{index}" for index in range(100)]
    assert commit.commits == 2 and commit.writes == 100


async def test_commits_start_an_interval_apart_unless_a_write_is_urgent() -> None:
    recorder = Recorder()
    commit: GroupCommit[str] = GroupCommit(recorder, 0.2)
    await commit.submit("a")
    await commit.submit("b")
    assert recorder.started[1] - recorder.started[0] >= 0.2 - 0.005
    await commit.submit("c", urgent=True)
    # The urgent write went without waiting out the interval after "b".
    assert recorder.started[2] - recorder.started[1] < 0.2
    assert recorder.batches == [["a"], ["b"], ["c"]]


async def test_an_urgent_write_cuts_short_the_wait_of_writes_already_pending() -> None:
    recorder = Recorder()
    commit: GroupCommit[str] = GroupCommit(recorder, 30.0)
    await commit.submit("first")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit.submit, "slow")
            await anyio.lowlevel.checkpoint()
            tg.start_soon(lambda: commit.submit("now", urgent=True))
    assert recorder.batches == [["first"], ["slow", "now"]]


async def test_a_failed_commit_fails_every_write_it_carried_and_the_next_commit_goes_on() -> None:
    recorder = Recorder()
    commit: GroupCommit[str] = GroupCommit(recorder, 0.01)
    await commit.submit("warm")
    recorder.fail_next = ConnectionError("redis went away")
    outcomes: dict[str, str] = {}

    async def write(name: str) -> None:
        try:
            await commit.submit(name)
            outcomes[name] = "ok"
        except ConnectionError:
            outcomes[name] = "failed"

    async with anyio.create_task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(write, name)
    assert outcomes == {"a": "failed", "b": "failed", "c": "failed"}
    await commit.submit("d")
    assert recorder.batches[-1] == ["d"]


async def test_a_leader_cancelled_mid_commit_fails_its_batch_and_hands_over_the_lead() -> None:
    recorder = Recorder()
    commit: GroupCommit[str] = GroupCommit(recorder, 0.0)
    recorder.gate = asyncio.Event()
    outcomes: dict[str, str] = {}

    async def write(name: str) -> None:
        try:
            await commit.submit(name)
            outcomes[name] = "ok"
        except CommitInterrupted:
            outcomes[name] = "interrupted"

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            leader_scope = anyio.CancelScope()

            async def lead() -> None:
                with leader_scope:
                    await commit.submit("leader")

            tg.start_soon(lead)
            while not recorder.started:
                await anyio.lowlevel.checkpoint()
            tg.start_soon(write, "after")  # pending while the leader's commit is in flight
            while len(commit._pending) < 1:
                await anyio.lowlevel.checkpoint()
            leader_scope.cancel()
            # The lead passed to "after", whose commit has started.
            while len(recorder.started) < 2:
                await anyio.lowlevel.checkpoint()
            recorder.gate.set()
    # "after" was not in the interrupted batch; it became the leader and committed.
    assert outcomes == {"after": "ok"}
    assert recorder.batches[-1] == ["after"]


async def test_a_waiting_writer_cancelled_is_skipped_in_the_hand_over() -> None:
    recorder = Recorder()
    commit: GroupCommit[str] = GroupCommit(recorder, 0.0)
    recorder.gate = asyncio.Event()
    done: list[str] = []

    async def write(name: str) -> None:
        await commit.submit(name)
        done.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(write, "leader")
            while not recorder.started:
                await anyio.lowlevel.checkpoint()
            gone = anyio.CancelScope()
            gone_ended = anyio.Event()

            async def cancelled_writer() -> None:
                try:
                    with gone:
                        await commit.submit("gone")
                finally:
                    gone_ended.set()

            tg.start_soon(cancelled_writer)
            tg.start_soon(write, "next")
            while len(commit._pending) < 2:
                await anyio.lowlevel.checkpoint()
            gone.cancel()
            await gone_ended.wait()
            recorder.gate.set()
    assert done == ["leader", "next"]
    # The cancelled writer's write still went out, with the next commit: its caller may
    # write it again, and readers skip a batch stored twice.
    assert recorder.batches[-1] == ["gone", "next"]
