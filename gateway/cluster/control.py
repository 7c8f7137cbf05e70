"""The messages processes send each other over the backplane, typed, and their one
serialized form (``to_dict`` / ``from_dict``) for backplanes that cross a process.

- ``Cancel``: the process running that generation (``node``) cancels it;
- ``FollowNotice``: someone on process ``follower`` follows this generation, so its owner
  (``node``) must not cancel it as abandoned, and writes it to the store at once;
- ``Broadcast``: deliver ``data`` to every socket, or to one user's sockets;
- ``RoomEvents``: events for every member of a room: a room generation's start, deltas
  (each ``RoomTokens`` a run of one kind) and end, and presence. ``origin`` is the
  session that caused a presence event: it is not told about its own join or leave.

Each message has one audience (``audience``): one process (cancel, follow notice), the
processes with members in one room (room events), or every process (broadcasts). A
backplane delivers a message only to its audience.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gateway.wire.events import REASONING, TEXT, DeltaKind, Done, Failed, RouteTrace, Terminal, ToolCallDelta, Usage


@dataclass(frozen=True, slots=True)
class Cancel:
    user: str
    id: str
    node: str  # the process producing it


@dataclass(frozen=True, slots=True)
class FollowNotice:
    user: str
    id: str
    node: str  # the process producing it
    follower: str  # the process following it


@dataclass(frozen=True, slots=True)
class Broadcast:
    data: Any
    user: str | None = None


@dataclass(frozen=True, slots=True)
class RoomStart:
    id: str
    epoch: str


@dataclass(frozen=True, slots=True)
class RoomTokens:
    """A run of consecutive deltas of one kind, up to ``last_seq``."""

    id: str
    last_seq: int
    text: str
    kind: DeltaKind = TEXT


@dataclass(frozen=True, slots=True)
class RoomEnd:
    id: str
    terminal: Terminal


@dataclass(frozen=True, slots=True)
class Presence:
    user: str
    event: str  # "join" or "leave"


RoomEvent = RoomStart | RoomTokens | RoomEnd | Presence


@dataclass(frozen=True, slots=True)
class RoomEvents:
    room: str
    events: tuple[RoomEvent, ...]
    origin: str | None = None


ControlMessage = Cancel | FollowNotice | Broadcast | RoomEvents


class MalformedMessage(ValueError):
    pass


# Who receives a message: one process, a room's processes, or all of them.
NODE = "node"
ROOM = "room"
BROADCAST = "broadcast"
PURPOSES = (NODE, ROOM, BROADCAST)


def audience(message: ControlMessage) -> tuple[str, str]:
    """(purpose, name): (``node``, its id), (``room``, its name) or (``broadcast``, "")."""
    if isinstance(message, RoomEvents):
        return ROOM, message.room
    if isinstance(message, Broadcast):
        return BROADCAST, ""
    return NODE, message.node


# The compact form of a delta's kind, for stores and the backplane: 0 answer text,
# 1 reasoning, [index] a tool call's later fragment, [index, call_id, name] its first.
WireKind = int | list[int | str | None]


def kind_to_wire(kind: DeltaKind) -> WireKind:
    if kind == TEXT:
        return 0
    if kind == REASONING:
        return 1
    assert isinstance(kind, ToolCallDelta)
    if kind.call_id is None and kind.name is None:
        return [kind.index]
    return [kind.index, kind.call_id, kind.name]


def kind_from_wire(value: object) -> DeltaKind:
    """Raises ``MalformedMessage`` for anything ``kind_to_wire`` does not produce."""
    if value == 0:
        return TEXT
    if value == 1:
        return REASONING
    if isinstance(value, list) and value and type(value[0]) is int and value[0] >= 0:
        index = value[0]
        if len(value) == 1:
            return ToolCallDelta(index)
        if len(value) == 3 and all(v is None or isinstance(v, str) for v in value[1:]):
            return ToolCallDelta(index, value[1], value[2])
    raise MalformedMessage("unknown delta kind")


def terminal_to_dict(terminal: Terminal) -> dict[str, Any]:
    if isinstance(terminal, Done):
        usage = terminal.usage
        counts: list[int | None] = [usage.prompt_tokens, usage.completion_tokens]
        if usage.reasoning_tokens is not None or usage.cached_tokens is not None:
            counts += [usage.reasoning_tokens, usage.cached_tokens]
        data: dict[str, Any] = {"done": terminal.finish_reason, "usage": counts}
        if terminal.route is not None:
            data["route"] = [terminal.route.name, list(terminal.route.deployments)]
        return data
    return {"failed": terminal.code, "message": terminal.message, "extra": terminal.extra}


def _optional_count(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def terminal_from_dict(data: dict[str, Any]) -> Terminal:
    if "done" in data:
        counts = list(data.get("usage") or (0, 0))
        prompt_tokens, completion_tokens = counts[:2]
        reasoning_tokens, cached_tokens = [*counts[2:4], None, None][:2]
        route = data.get("route")
        trace = (RouteTrace(str(route[0]), tuple(str(name) for name in route[1]))
                 if isinstance(route, list) and len(route) == 2 and isinstance(route[1], list) else None)
        return Done(str(data["done"]), Usage(int(prompt_tokens), int(completion_tokens),
                                             _optional_count(reasoning_tokens), _optional_count(cached_tokens)), trace)
    extra = data.get("extra")
    return Failed(str(data["failed"]), str(data.get("message", "")), extra if isinstance(extra, dict) else {})


def _event_to_dict(event: RoomEvent) -> dict[str, Any]:
    if isinstance(event, RoomEnd):
        return {"k": "end", "id": event.id, "terminal": terminal_to_dict(event.terminal)}
    if isinstance(event, RoomTokens):
        data: dict[str, Any] = {"k": "tokens", "id": event.id, "last_seq": event.last_seq, "text": event.text}
        if event.kind != TEXT:
            data["kind"] = kind_to_wire(event.kind)
        return data
    kind = {RoomStart: "start", RoomTokens: "tokens", Presence: "presence"}[type(event)]
    return {"k": kind, **asdict(event)}


def _event_from_dict(data: dict[str, Any]) -> RoomEvent:
    kind = data.get("k")
    if kind == "tokens":
        kind = kind_from_wire(data["kind"]) if "kind" in data else TEXT
        return RoomTokens(str(data["id"]), int(data["last_seq"]), str(data["text"]), kind)
    if kind == "start":
        return RoomStart(str(data["id"]), str(data["epoch"]))
    if kind == "end":
        return RoomEnd(str(data["id"]), terminal_from_dict(data["terminal"]))
    if kind == "presence":
        return Presence(str(data["user"]), str(data["event"]))
    raise MalformedMessage(f"unknown room event {kind!r}")


def to_dict(message: ControlMessage) -> dict[str, Any]:
    if isinstance(message, RoomEvents):
        return {"op": "room", "room": message.room, "origin": message.origin,
                "events": [_event_to_dict(event) for event in message.events]}
    op = {Cancel: "cancel", FollowNotice: "follow", Broadcast: "broadcast"}[type(message)]
    return {"op": op, **asdict(message)}


def from_dict(data: Any) -> ControlMessage:
    """Raises ``MalformedMessage`` for anything that is not a message of this version."""
    if not isinstance(data, dict):
        raise MalformedMessage("not an object")
    try:
        op = data.get("op")
        if op == "room":
            origin = data.get("origin")
            return RoomEvents(str(data["room"]), tuple(_event_from_dict(e) for e in data["events"]),
                              str(origin) if origin is not None else None)
        if op == "cancel":
            return Cancel(str(data["user"]), str(data["id"]), str(data["node"]))
        if op == "follow":
            return FollowNotice(str(data["user"]), str(data["id"]), str(data["node"]), str(data["follower"]))
        if op == "broadcast":
            user = data.get("user")
            return Broadcast(data.get("data"), str(user) if user is not None else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage(str(exc)) from None
    raise MalformedMessage(f"unknown op {op!r}")
