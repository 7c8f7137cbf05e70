"""The process's registry: its connections, running generations and rooms, the
deadline timer every connection shares, the control messages other processes send, and
the drain at shutdown.

The hub's task group (opened by the app's lifespan) owns every generation and every
background loop; each background loop is supervised, so none dies silently. One of them is
the heartbeat timer of every connection (``watch``): an idle connection holds no task of
its own while it waits for its next ping or deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from config import Settings
from gateway.auth import Authenticator
from gateway.backends import Backend
from gateway.cluster.base import Cluster, LimitStore, StreamStore
from gateway.cluster.control import (
    Broadcast,
    Cancel,
    ControlMessage,
    FollowNotice,
    RoomEnd,
    RoomEvents,
    RoomStart,
    RoomTokens,
    audience,
)
from gateway.core.liveness import Deadlines
from gateway.core.ports import Member
from gateway.core.state import SHUTTING_DOWN
from gateway.generation import Generation
from gateway.metrics import Metrics
from gateway.supervise import supervise
from gateway.wire.coalesce import End, Frame, OutItem, Start, StreamRef, delta_item
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import RetryLater
from gateway.wire.outbound import encode_broadcast, encode_presence

logger = logging.getLogger("gateway.hub")

# Deadlines this close together are handled in one wake-up of the timer; a ping or a close
# may be this much late, never early.
TIMER_SLACK_S = 0.01

_OUTCOMES = frozenset({"stop", "length", "cancelled", "abandoned", "error", "internal"} | {str(c) for c in ErrorCode})


def room_items(message: RoomEvents) -> list[tuple[OutItem, bool]]:
    """What a room's members are sent for ``message``, the same items for every member,
    each with whether it may be dropped for a member that cannot take it now (presence:
    it must never be what closes a member as a slow consumer)."""
    items: list[tuple[OutItem, bool]] = []
    room = message.room
    for event in message.events:
        if isinstance(event, RoomTokens):
            items.append((delta_item(StreamRef.of(event.id), event.last_seq, event.text, event.kind), False))
        elif isinstance(event, RoomStart):
            items.append((Start(StreamRef.of(event.id), event.epoch, room), False))
        elif isinstance(event, RoomEnd):
            items.append((End(StreamRef.of(event.id), event.terminal), False))
        else:
            items.append((Frame(None, encode_presence(room, event.user, event.event)), True))
    return items


class Hub:
    def __init__(self, settings: Settings, backend: Backend, authenticator: Authenticator, metrics: Metrics,
                 cluster: Cluster) -> None:
        self.settings = settings
        self.backend = backend
        self.auth = authenticator
        self.metrics = metrics
        self.cluster = cluster
        self.store: StreamStore = cluster.store
        self.limits: LimitStore = cluster.limits
        self.node_id = cluster.node_id
        self.connections: set[Member] = set()
        self.generations: dict[tuple[str, str], Generation] = {}
        self.rooms: dict[str, set[Member]] = {}
        self.open_sockets = 0
        # Of those, the ones still waiting for their first-message authentication.
        self.pending_auth = 0
        self.draining = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._no_generations = anyio.Event()
        self._no_generations.set()
        self._no_connections = anyio.Event()
        self._no_connections.set()
        self._deadlines: Deadlines[Member] = Deadlines()
        self._wake_timer = anyio.Event()

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Connect the cluster (raises ``Unavailable`` when it cannot) and start the timer."""
        self._task_group = task_group
        cluster = self.cluster
        cluster.health.on_change = lambda up: self.metrics.set_cluster_up(up)
        cluster.backplane.set_handler(self.handle_control)
        self.metrics.store_evictions.read = lambda: float(cluster.store.evicted)
        await cluster.start(self._spawn_supervised)
        self.metrics.set_cluster_up(cluster.health.up)
        task_group.start_soon(supervise, "connection timer", self._run_timer)

    def _spawn_supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        assert self._task_group is not None, "the hub is not running"
        self._task_group.start_soon(supervise, name, loop, name=name)

    async def aclose(self) -> None:
        await self.cluster.aclose()

    def is_draining(self) -> bool:
        return self.draining

    @property
    def cluster_up(self) -> bool:
        return self.cluster.health.up

    def spawn(self, func: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        assert self._task_group is not None, "the hub is not running"
        self._task_group.start_soon(func, *args, name=name)

    # Sockets --------------------------------------------------------------------------------

    def socket_opened(self) -> None:
        self.open_sockets += 1
        self.metrics.connections.set(self.open_sockets)
        self.metrics.connections_total.inc()
        if self._no_connections.is_set():
            self._no_connections = anyio.Event()

    def socket_closed(self) -> None:
        self.open_sockets -= 1
        self.metrics.connections.set(self.open_sockets)
        if self.open_sockets == 0:
            self._no_connections.set()

    # Connection deadlines ------------------------------------------------------------------

    def watch(self, connection: Member, when: float) -> None:
        """Call ``connection.on_deadline(now)`` at ``when``, or earlier if it was due earlier."""
        if self._deadlines.schedule(connection, when):
            self._wake_timer.set()

    def unwatch(self, connection: Member) -> None:
        self._deadlines.remove(connection)

    async def _run_timer(self) -> None:
        deadlines = self._deadlines
        while True:
            delay = deadlines.next_at() + TIMER_SLACK_S - anyio.current_time()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._wake_timer.wait()
                if self._wake_timer.is_set():
                    self._wake_timer = anyio.Event()
                continue
            now = anyio.current_time()
            for connection in deadlines.pop_due(now):
                try:
                    when = connection.on_deadline(now)
                except Exception:
                    logger.exception("conn=%s deadline handling failed", connection.session_id)
                    continue
                if when is not None:
                    deadlines.schedule(connection, when)

    # Generations ----------------------------------------------------------------------------

    def start_generation(self, generation: Generation) -> None:
        self.generations[generation.key] = generation
        self.metrics.active_generations.set(len(self.generations))
        if self._no_generations.is_set():
            self._no_generations = anyio.Event()
        self.spawn(generation.run, name=f"generation {generation.id}")

    def generation_ended(self, generation: Generation, outcome: str) -> None:
        if self.generations.get(generation.key) is generation:
            del self.generations[generation.key]
        self.metrics.active_generations.set(len(self.generations))
        self.metrics.generations_total.labels(outcome if outcome in _OUTCOMES else "other", generation.transport).inc()
        if not self.generations:
            self._no_generations.set()

    def generation_detached(self, generation: Generation) -> None:
        """Its last follower went away: cancel it unless someone resumes it within the grace."""
        if self.draining:
            return
        if self.resume_grace_s(generation) <= 0:
            generation.cancel(None, "abandoned")
            return
        self.spawn(self._abandon_unless_resumed, generation)

    def resume_grace_s(self, generation: Generation) -> float:
        """How long a generation with no follower runs on, waiting for a resume."""
        settings = self.settings
        if generation.transport == "http" and settings.http_resume_grace_s is not None:
            return settings.http_resume_grace_s
        return settings.resume_grace_s

    async def _abandon_unless_resumed(self, generation: Generation) -> None:
        grace = self.resume_grace_s(generation)
        while not generation.finished.is_set():
            detached_at = generation.detached_at
            if detached_at is None or generation.follows:
                return  # resumed here
            deadline = max(detached_at, generation.last_remote_follow) + grace
            now = anyio.current_time()
            if now >= deadline:
                logger.info("user=%s stream=%s not resumed within %.0fs: cancelling",
                            generation.meta.user, generation.id, grace)
                generation.cancel(None, "abandoned")
                return
            with anyio.move_on_after(deadline - now):
                await generation.finished.wait()

    # Control messages between processes ---------------------------------------------------

    def handle_control(self, message: ControlMessage) -> None:
        self.metrics.backplane_received.labels(audience(message)[0]).inc()
        if isinstance(message, Cancel):
            generation = self.generations.get((message.user, message.id))
            if generation is not None:
                generation.cancel(None, "cancelled")
        elif isinstance(message, FollowNotice):
            generation = self.generations.get((message.user, message.id))
            if generation is not None:
                generation.followed_elsewhere()
        elif isinstance(message, Broadcast):
            frame = Frame(None, encode_broadcast(message.data))
            user = message.user
            for connection in list(self.connections):
                if user is None or connection.user == user:
                    connection.send_urgent(frame)
        elif isinstance(message, RoomEvents):
            members = self.rooms.get(message.room)
            if members:
                items = room_items(message)
                # A member is not told about its own join or leave.
                dropped = 0
                for connection in list(members):
                    if connection.session_id != message.origin:
                        for item, droppable in items:
                            if not droppable:
                                connection.send_urgent(item)
                            elif not connection.send_droppable(item):
                                dropped += 1
                if dropped:
                    self.metrics.presence_dropped.inc(dropped)

    async def publish(self, message: ControlMessage) -> None:
        await self.cluster.backplane.publish(message)
        self.metrics.backplane_published.labels(audience(message)[0]).inc()

    # Rooms -------------------------------------------------------------------------------

    async def room_joined(self, room: str, connection: Member) -> None:
        """The room's messages reach this process from its first member's join on."""
        members = self.rooms.get(room)
        if members is None:
            members = self.rooms[room] = set()
        members.add(connection)
        if len(members) == 1:
            await self.cluster.backplane.subscribe_room(room)

    async def room_left(self, room: str, connection: Member) -> None:
        """... and until its last member here leaves."""
        members = self.rooms.get(room)
        if members is not None:
            members.discard(connection)
            if not members:
                del self.rooms[room]
                await self.cluster.backplane.unsubscribe_room(room)

    # Shutdown -----------------------------------------------------------------------------

    async def drain(self, force_exit: Callable[[], bool] = lambda: False) -> None:
        """Graceful shutdown: refuse new generations, let running ones finish for up to
        ``drain_timeout_s``, end the rest with ``shutting_down``, close every socket 1001."""
        if self.draining:
            return
        self.draining = True
        self.metrics.draining.set(1)
        logger.info("draining: %d connection(s), %d generation(s) running",
                    self.open_sockets, len(self.generations))
        with anyio.move_on_after(self.settings.drain_timeout_s):
            while not self._no_generations.is_set() and not force_exit():
                with anyio.move_on_after(0.5):
                    await self._no_generations.wait()
        if self.generations:
            logger.info("drain timeout: ending %d generation(s) with shutting_down", len(self.generations))
        for generation in list(self.generations.values()):
            generation.cancel(SHUTTING_DOWN.terminal, str(ErrorCode.SHUTTING_DOWN))
        for connection in list(self.connections):
            connection.shut_down()
        with anyio.move_on_after(5.0):
            await self._no_connections.wait()
        logger.info("drained")


async def publish_or_unavailable(hub: Hub, message: ControlMessage) -> None:
    """Publish for a client's request: a failure is the client's error to retry."""
    try:
        await hub.publish(message)
    except Exception:
        raise RetryLater("the cluster is unreachable right now; try again") from None
