"""The send path alone, with a socket that sends only when the test lets it: frames keep
their order under pressure, and droppable frames never build a backlog."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import pytest

from gateway.core.liveness import Liveness
from gateway.metrics import Metrics
from gateway.outbox import Outbox
from gateway.wire.coalesce import Frame, StreamRef, Token

pytestmark = pytest.mark.anyio


class Owner:
    """The outbox's connection, as far as the outbox sees it."""

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self.task_group = task_group
        self.closing = False
        self.running = True
        self.following = False
        self.slow_consumers = 0

    def start_task(self, func: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        self.task_group.start_soon(func)
        return True

    def slow_consumer_clock_started(self) -> None:
        return None

    def slow_consumer(self) -> None:
        self.slow_consumers += 1

    def socket_gone(self) -> None:
        return None

    def follow_ended(self, follow: Any) -> None:
        return None


class GatedSocket:
    """An ASGI ``send`` that records each frame and waits for the test before the next."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gate = anyio.Event()
        self.waiting = anyio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        self.waiting.set()
        await self.gate.wait()
        self.sent.append(json.loads(message["text"]))

    def texts(self) -> list[str]:
        return [str(frame.get("text", frame.get("type"))) for frame in self.sent]


def outbox_for(owner: Owner, socket: GatedSocket, limit: int = 4) -> Outbox:
    liveness = Liveness(now=0.0, heartbeat_interval_s=15, heartbeat_timeout_s=45, slow_consumer_timeout_s=10)
    send: Callable[[Any], Awaitable[None]] = socket.send
    return Outbox(owner, limit, send, None, liveness, Metrics())


async def test_what_was_queued_while_a_batch_went_out_goes_before_the_overflow() -> None:
    ref = StreamRef.of("room-answer")
    async with anyio.create_task_group() as tg:
        owner = Owner(tg)
        socket = GatedSocket()
        outbox = outbox_for(owner, socket, limit=4)
        # A room's tokens reach a member through send_urgent, which never waits.
        outbox.send_urgent(Token(ref, 0, "t0"))
        with anyio.fail_after(5):
            await socket.waiting.wait()  # the writer took [t0] and is sending it
        for seq in range(1, 8):  # t1-t4 fill the queue, t5-t7 wait in the overflow
            outbox.send_urgent(Token(ref, seq, f"t{seq}"))
        socket.gate.set()
        with anyio.fail_after(5):
            while len("".join(socket.texts())) < len("t0t1t2t3t4t5t6t7"):
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert "".join(socket.texts()) == "t0t1t2t3t4t5t6t7"
    assert owner.slow_consumers == 0


async def test_a_droppable_frame_is_dropped_while_anything_waits() -> None:
    async with anyio.create_task_group() as tg:
        owner = Owner(tg)
        socket = GatedSocket()
        outbox = outbox_for(owner, socket, limit=2)
        presence = Frame(None, '{"type":"presence","room":"r","user":"u","event":"join"}')
        assert outbox.send_droppable(presence) is True  # caught up: it goes
        with anyio.fail_after(5):
            await socket.waiting.wait()
        assert outbox.send_droppable(presence) is False  # the writer is busy
        outbox.send_urgent(Frame(None, '{"type":"broadcast","data":1}'))
        outbox.send_urgent(Frame(None, '{"type":"broadcast","data":2}'))
        outbox.send_urgent(Frame(None, '{"type":"broadcast","data":3}'))  # to the overflow
        assert outbox.send_droppable(presence) is False
        socket.gate.set()
        with anyio.fail_after(5):
            while len(socket.sent) < 4:
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert [f["type"] for f in socket.sent] == ["presence", "broadcast", "broadcast", "broadcast"]
    assert [f["data"] for f in socket.sent[1:]] == [1, 2, 3]
