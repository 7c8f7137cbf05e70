"""Backplane on Redis sharded pub/sub (``SPUBLISH`` / ``SSUBSCRIBE``), with channels split by
audience, so that a process receives only what concerns it:

- ``<prefix>v3:ctl:node:<node id>``: cancels and follow notices for the generations this
  process runs, and the store's "new entries" notices for the streams it follows;
- ``ctl:room:<room>``: a room's events, subscribed while the room has a member here (from
  the first join to the last leave);
- ``ctl:bcast``: broadcasts.

A sharded channel lives on the node that owns its slot, so a subscription is a connection
to that node (one per node with channels of ours; on single Redis, one). Single Redis 7
runs the same commands. When Redis goes away, or a node reports that a channel's slot
moved (it ends the subscription with ``sunsubscribe``), ``run`` raises and the cluster's
supervisor starts it again with backoff, which asks the cluster for its slots again and
subscribes everything anew; messages published meanwhile are lost (pub/sub is at most
once), which is why nothing here carries tokens that exist nowhere else: room tokens are
also in the store, and a follower whose notice was lost reads at its next poll.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from gateway.cluster.base import Handler
from gateway.cluster.control import (
    BROADCAST,
    NODE,
    ROOM,
    ControlMessage,
    FollowNotice,
    MalformedMessage,
    audience,
    from_dict,
    to_dict,
)
from gateway.cluster.redis.context import CLOSE_TIMEOUT_S, RedisContext, RedisUnavailable

logger = logging.getLogger("gateway.backplane")

# How long a room's first join waits for its subscription to be confirmed.
SUBSCRIBE_TIMEOUT_S = 2.0
# The store's notice that followed streams have new entries: {"op": "written", "keys": [...]}.
WRITTEN_OP = "written"


def written_payload(keys: list[str]) -> bytes:
    return orjson.dumps({"op": WRITTEN_OP, "keys": keys})


class _Session:
    """One life of the subscriptions: a pub/sub connection per node that owns one of our
    channels, each read by a task of its own in ``tg``."""

    def __init__(self, backplane: RedisBackplane, tg: anyio.abc.TaskGroup) -> None:
        self.backplane = backplane
        self.ctx = backplane.ctx
        self.tg = tg
        self.pubsubs: dict[str, Any] = {}  # node URL -> its PubSub
        self.clients: list[aioredis.Redis] = []
        self.channel_url: dict[str, str] = {}
        self.confirmed: dict[str, anyio.Event] = {}
        self.leaving: dict[str, int] = {}  # our own unsubscribes not yet confirmed
        self.left: dict[str, anyio.Event] = {}
        # A subscription or unsubscription failed: the session ends, and the next one
        # subscribes everything wanted then.
        self.failed = False

    def _fail(self) -> None:
        self.failed = True
        self.tg.cancel_scope.cancel()

    async def subscribe(self, channel: str) -> None:
        """Returns once the node confirmed the subscription (or after the timeout)."""
        if channel in self.channel_url:
            return
        try:
            url = await self.ctx.channel_node_url(channel)
            self.channel_url[channel] = url
            event = self.confirmed[channel] = anyio.Event()
            pubsub = self.pubsubs.get(url)
            if pubsub is None:
                client = self.ctx.node_client(url)
                self.clients.append(client)
                pubsub = client.pubsub()
                await pubsub.ssubscribe(channel)
                self.pubsubs[url] = pubsub  # read from its first subscription on
                self.tg.start_soon(self._read, pubsub)
            else:
                await pubsub.ssubscribe(channel)
        except Exception:
            self._fail()
            raise
        with anyio.move_on_after(SUBSCRIBE_TIMEOUT_S):
            await event.wait()

    async def unsubscribe(self, channel: str) -> None:
        """Returns once the node confirmed it (or after the timeout)."""
        url = self.channel_url.pop(channel, None)
        self.confirmed.pop(channel, None)
        if url is not None:
            self.leaving[channel] = self.leaving.get(channel, 0) + 1
            event = self.left[channel] = anyio.Event()
            try:
                await self.pubsubs[url].sunsubscribe(channel)
            except Exception:
                self._fail()
                raise
            with anyio.move_on_after(SUBSCRIBE_TIMEOUT_S):
                await event.wait()

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if message is None:
                    continue
                kind = message.get("type")
                channel = message.get("channel")
                if kind == "smessage":
                    self.backplane._received(channel, message["data"])
                elif kind == "ssubscribe":
                    event = self.confirmed.get(channel)
                    if event is not None:
                        event.set()
                elif kind == "sunsubscribe":
                    leaving = self.leaving.get(channel, 0)
                    if leaving:
                        self.leaving[channel] = leaving - 1
                        left = self.left.pop(channel, None)
                        if left is not None:
                            left.set()
                    elif channel in self.channel_url:
                        # Not asked for: the channel's slot moved to another node.
                        raise RedisUnavailable("a subscribed channel moved to another node")
        except (RedisError, OSError) as exc:
            # Cancelled meanwhile (redis-py may turn a cancelled read into a connection
            # error): a stop, not a failure.
            await anyio.lowlevel.checkpoint()
            self.ctx.report_error(exc)
            raise RedisUnavailable(f"backplane subscription lost: {type(exc).__name__}") from None

    async def aclose(self) -> None:
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            for pubsub in self.pubsubs.values():
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            for client in self.clients:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()


class RedisBackplane:
    name = "redis"

    def __init__(self, context: RedisContext) -> None:
        self.ctx = context
        self.node_channel = context.channel(NODE, context.node_id)
        self.broadcast_channel = context.channel("bcast")
        self._handler: Handler | None = None
        self._rooms: set[str] = set()
        self._session: _Session | None = None
        self._started = False
        # The stream store's hooks: a follow notice names a follower's process; a
        # "written" notice names followed streams with new entries.
        self.on_follow: Callable[[FollowNotice], None] = lambda notice: None
        self.on_written: Callable[[list[str]], None] = lambda keys: None

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def _channel_of(self, message: ControlMessage) -> str:
        purpose, name = audience(message)
        if purpose == ROOM:
            return self.ctx.channel(ROOM, name)
        if purpose == BROADCAST:
            return self.broadcast_channel
        return self.ctx.channel(NODE, name)

    async def run(self) -> None:
        """One subscription session; raises when a connection fails or a channel moved.
        The subscriptions hold connections of their own, not the command pool's."""
        if self._started:
            # Started again after a failure: the slots may have moved since.
            with contextlib.suppress(RedisError, OSError):
                await self.ctx.refresh_topology()
        self._started = True
        session: _Session | None = None
        try:
            async with anyio.create_task_group() as tg:
                session = self._session = _Session(self, tg)
                for channel in (self.node_channel, self.broadcast_channel,
                                *(self.ctx.channel(ROOM, room) for room in list(self._rooms))):
                    await session.subscribe(channel)
                self.ctx.report(True)
                await anyio.sleep_forever()
            if session is not None and session.failed:
                raise RedisUnavailable("backplane subscription lost")
        except (RedisError, OSError) as exc:
            self.ctx.report_error(exc)
            raise RedisUnavailable(f"backplane subscription lost: {type(exc).__name__}") from None
        except BaseExceptionGroup as group:
            # A reader's failure: one line for the supervisor, as any lost connection.
            _, rest = group.split((RedisUnavailable, RedisError, RedisClusterException, OSError))
            if rest is None:
                raise RedisUnavailable("backplane subscription lost") from None
            raise
        finally:
            # Closed once its readers have stopped, so that none takes the close for a failure.
            if session is not None:
                if self._session is session:
                    self._session = None
                await session.aclose()

    def _received(self, channel: str, data: Any) -> None:
        try:
            decoded = orjson.loads(data)
            if channel == self.node_channel and isinstance(decoded, dict) and decoded.get("op") == WRITTEN_OP:
                self.on_written([str(key) for key in decoded.get("keys", ())])
                return
            control = from_dict(decoded)
        except (orjson.JSONDecodeError, MalformedMessage, TypeError):
            logger.warning("ignoring a malformed backplane message")
            return
        if isinstance(control, FollowNotice):
            self.on_follow(control)
        if self._handler is not None:
            try:
                self._handler(control)
            except Exception:
                logger.exception("backplane handler failed")

    async def publish(self, message: ControlMessage) -> None:
        await self.ctx.client.spublish(self._channel_of(message), orjson.dumps(to_dict(message)))

    async def subscribe_room(self, room: str) -> None:
        self._rooms.add(room)
        session = self._session
        if session is not None:
            # A failure ends the session: the next one subscribes every room wanted.
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await session.subscribe(self.ctx.channel(ROOM, room))

    async def unsubscribe_room(self, room: str) -> None:
        self._rooms.discard(room)
        session = self._session
        if session is not None:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await session.unsubscribe(self.ctx.channel(ROOM, room))
