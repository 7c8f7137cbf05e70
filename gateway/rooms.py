"""A connection's rooms: joining and leaving them (as the token's rooms claim allows),
and telling the other members, on every process, who came and went."""

from __future__ import annotations

import contextlib
from typing import Protocol

import anyio

from gateway.cluster.control import Presence, RoomEvents
from gateway.core.ports import Member
from gateway.core.state import ConnectionState
from gateway.hub import Hub, publish_or_unavailable
from gateway.outbox import Outbox
from gateway.wire.coalesce import Frame
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import GatewayError
from gateway.wire.outbound import encode_room_ack


class RoomsHost(Member, Protocol):
    hub: Hub
    state: ConnectionState
    outbox: Outbox


class Rooms:
    """Created on a connection's first join: most connections never join a room."""

    __slots__ = ("claim", "host", "joined")

    def __init__(self, host: RoomsHost, claim: object) -> None:
        self.host = host
        self.claim = claim  # the token's rooms claim: a list of room names, or "*"
        self.joined: set[str] = set()

    async def join(self, room: str) -> None:
        host = self.host
        if not host.state.admit_join(room, self.claim, self.joined):
            return
        self.joined.add(room)
        await host.hub.room_joined(room, host)
        await host.outbox.send_queued(Frame(None, encode_room_ack("joined", room)))
        await self._publish_presence(room, "join")

    async def leave(self, room: str) -> None:
        host = self.host
        if room not in self.joined:
            raise GatewayError("not in this room", code=ErrorCode.NOT_FOUND)
        self.joined.discard(room)
        await host.hub.room_left(room, host)
        await host.outbox.send_queued(Frame(None, encode_room_ack("left", room)))
        await self._publish_presence(room, "leave")

    async def leave_all(self) -> None:
        """The connection closed: leave every room, telling the others (best effort)."""
        joined = self.joined
        for room in list(joined):
            joined.discard(room)
            with anyio.move_on_after(1.0), contextlib.suppress(Exception):
                await self.host.hub.room_left(room, self.host)
                await self._publish_presence(room, "leave")

    async def _publish_presence(self, room: str, event: str) -> None:
        host = self.host
        await publish_or_unavailable(host.hub, RoomEvents(room, (Presence(host.user, event),), host.session_id))
