"""The gateway's process-wide state: connections, running generations, rooms, the cluster
parts (stream store, backplane, limits) and draining.

The hub's task group (opened by the app's lifespan) owns every generation and every
background loop; each background loop is supervised, so none dies silently. One of them is
the heartbeat timer of every connection (``watch``): an idle connection holds no task of
its own while it waits for its next ping or deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from config import Settings
from gateway.auth import Authenticator
from gateway.backends import Backend
from gateway.backplane.base import Backplane, ControlMessage
from gateway.generation import Generation
from gateway.limits.base import LimitStore
from gateway.liveness import Deadlines
from gateway.metrics import Metrics
from gateway.store.base import StreamStore
from gateway.supervise import supervise
from gateway.wire.codes import ErrorCode
from gateway.wire.outbound import encode_broadcast, encode_error

if TYPE_CHECKING:
    from gateway.connection import Connection
    from gateway.redis_support import RedisContext

logger = logging.getLogger("gateway.hub")

# Deadlines this close together are handled in one wake-up of the timer; a ping or a close
# may be this much late, never early.
TIMER_SLACK_S = 0.01

_OUTCOMES = frozenset({"stop", "length", "cancelled", "abandoned", "error", "internal"} | {str(c) for c in ErrorCode})


class Hub:
    def __init__(self, settings: Settings, backend: Backend, authenticator: Authenticator, metrics: Metrics,
                 store: StreamStore, backplane: Backplane, limits: LimitStore,
                 redis: RedisContext | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.auth = authenticator
        self.metrics = metrics
        self.store = store
        self.backplane = backplane
        self.limits = limits
        self.redis = redis
        self.node_id = redis.node_id if redis is not None else "local"
        self.connections: set[Connection] = set()
        self.generations: dict[tuple[str, str], Generation] = {}
        self.rooms: dict[str, set[Connection]] = {}
        self.open_sockets = 0
        self.draining = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._no_generations = anyio.Event()
        self._no_generations.set()
        self._no_connections = anyio.Event()
        self._no_connections.set()
        self._deadlines: Deadlines[Connection] = Deadlines()
        self._wake_timer = anyio.Event()

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group
        if self.redis is not None:
            redis = self.redis
            redis.on_state_change = lambda up: self.metrics.redis_up.set(1 if up else 0)
            await redis.start()
            task_group.start_soon(supervise, "redis heartbeat", redis.heartbeat)
        task_group.start_soon(supervise, "connection timer", self._run_timer)
        await self.store.start()
        await self.backplane.start(self.handle_control)
        redis_context = self.redis
        on_failure: Callable[[], None] = (
            (lambda: redis_context.report(False)) if redis_context is not None else (lambda: None))
        task_group.start_soon(supervise, "backplane listener", self.backplane.run, on_failure)

    async def aclose(self) -> None:
        await self.backplane.aclose()
        await self.store.aclose()
        if self.redis is not None:
            await self.redis.aclose()

    def is_draining(self) -> bool:
        return self.draining

    @property
    def redis_up(self) -> bool:
        return self.redis is None or self.redis.up

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

    def watch(self, connection: Connection, when: float) -> None:
        """Call ``connection.on_deadline(now)`` at ``when``, or earlier if it was due earlier."""
        if self._deadlines.schedule(connection, when):
            self._wake_timer.set()

    def unwatch(self, connection: Connection) -> None:
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
        self.metrics.generations_total.labels(outcome if outcome in _OUTCOMES else "other").inc()
        if not self.generations:
            self._no_generations.set()

    def generation_detached(self, generation: Generation) -> None:
        """Its last follower went away: cancel it unless someone resumes it within the grace."""
        if self.draining:
            return
        if self.settings.resume_grace_s <= 0:
            generation.cancel(None, "abandoned")
            return
        self.spawn(self._abandon_unless_resumed, generation)

    async def _abandon_unless_resumed(self, generation: Generation) -> None:
        grace = self.settings.resume_grace_s
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
        op = message.get("op")
        if op == "cancel":
            generation = self.generations.get((str(message.get("user")), str(message.get("id"))))
            if generation is not None:
                generation.cancel(None, "cancelled")
        elif op == "follow":
            generation = self.generations.get((str(message.get("user")), str(message.get("id"))))
            if generation is not None:
                generation.last_remote_follow = anyio.current_time()
        elif op == "broadcast":
            frame = encode_broadcast(message.get("data"))
            user = message.get("user")
            for connection in list(self.connections):
                if user is None or connection.user == user:
                    connection.push(frame)
        elif op == "room":
            room = message.get("room")
            frames = message.get("frames")
            if isinstance(room, str) and isinstance(frames, list):
                # A member is not told about its own join or leave.
                origin = message.get("origin")
                for connection in list(self.rooms.get(room, ())):
                    if connection.session_id != origin:
                        connection.push_room(frames)

    async def publish(self, message: ControlMessage) -> None:
        await self.backplane.publish(message)

    # Rooms -------------------------------------------------------------------------------

    def room_joined(self, room: str, connection: Connection) -> None:
        self.rooms.setdefault(room, set()).add(connection)

    def room_left(self, room: str, connection: Connection) -> None:
        members = self.rooms.get(room)
        if members is not None:
            members.discard(connection)
            if not members:
                del self.rooms[room]

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
            generation.cancel(encode_error(generation.id, ErrorCode.SHUTTING_DOWN, "the server is shutting down"),
                              str(ErrorCode.SHUTTING_DOWN))
        for connection in list(self.connections):
            connection.shut_down()
        with anyio.move_on_after(5.0):
            await self._no_connections.wait()
        logger.info("drained")
