"""Outbound frames: every frame the server sends, encoded from typed values.

``encode_token`` is the hot path (one call per token frame); the stream id arrives
JSON-encoded once per generation (``StreamRef.id_json``) so it is not encoded per token.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.wire import PROTOCOL
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import failure
from gateway.wire.events import Done, Failed, RouteTrace, Terminal, ToolCallDelta, Usage

PING_FRAME = '{"type":"ping"}'
PONG_FRAME = '{"type":"pong"}'


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def encode_hello(*, session: str, user: str, heartbeat_s: float, limits: dict[str, Any],
                 resumable: list[dict[str, str]] | None = None, routes: list[str] | None = None) -> str:
    """``routes``: the model names a client may ask for, when routes are configured."""
    heartbeat: float | int = int(heartbeat_s) if float(heartbeat_s).is_integer() else heartbeat_s
    frame: dict[str, Any] = {
        "type": "hello",
        "session": session,
        "user": user,
        "protocol": PROTOCOL,
        "heartbeat_s": heartbeat,
        "limits": limits,
        "resumable": resumable or [],
    }
    if routes is not None:
        frame["routes"] = routes
    return dumps(frame)


def encode_start(stream_id: str, epoch: str | None = None, *, resumed: bool = False,
                 room: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "start", "id": stream_id}
    if epoch is not None:
        frame["epoch"] = epoch
    if resumed:
        frame["resumed"] = True
    if room is not None:
        frame["room"] = room
    return dumps(frame)


def encode_presence(room: str, user: str, event: str) -> str:
    return dumps({"type": "presence", "room": room, "user": user, "event": event})


def encode_broadcast(data: Any) -> str:
    return dumps({"type": "broadcast", "data": data})


def encode_room_ack(kind: str, room: str) -> str:
    """``joined`` or ``left``."""
    return dumps({"type": kind, "room": room})


def encode_terminal(stream_id: str, terminal: Terminal) -> str:
    if isinstance(terminal, Done):
        frame: dict[str, Any] = {
            "type": "done",
            "id": stream_id,
            "finish_reason": terminal.finish_reason,
            "usage": usage_dict(terminal.usage),
        }
        if terminal.route is not None:
            frame["route"] = route_dict(terminal.route)
        return dumps(frame)
    return encode_failure(stream_id, terminal)


def route_dict(route: RouteTrace) -> dict[str, Any]:
    return {"name": route.name, "deployments": list(route.deployments)}


def usage_dict(usage: Usage) -> dict[str, int]:
    """``prompt_tokens`` and ``completion_tokens``, and the others when known."""
    out = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    if usage.reasoning_tokens is not None:
        out["reasoning_tokens"] = usage.reasoning_tokens
    if usage.cached_tokens is not None:
        out["cached_tokens"] = usage.cached_tokens
    return out


def encode_failure(stream_id: str | None, failed: Failed) -> str:
    frame: dict[str, Any] = {"type": "error", "id": stream_id, "code": failed.code, "message": failed.message}
    frame.update(failed.extra)
    return dumps(frame)


def encode_error(stream_id: str | None, code: ErrorCode, message: str, **extra: Any) -> str:
    return encode_failure(stream_id, Failed(str(code), message, extra))


def encode_exception(stream_id: str | None, exc: BaseException) -> str:
    """Any exception as an error frame (see ``gateway.wire.errors.failure``)."""
    return encode_failure(stream_id, failure(exc))


def encode_token(id_json: str, seq: int, text: str) -> str:
    return '{"type":"token","id":' + id_json + ',"seq":' + str(seq) + ',"text":' + dumps(text) + "}"


def encode_reasoning(id_json: str, seq: int, text: str) -> str:
    return '{"type":"reasoning","id":' + id_json + ',"seq":' + str(seq) + ',"text":' + dumps(text) + "}"


def encode_tool_call(id_json: str, seq: int, call: ToolCallDelta, arguments: str) -> str:
    """``call_id`` and ``name`` only on the first frame of each ``index``."""
    head = '{"type":"tool_call","id":' + id_json + ',"seq":' + str(seq) + ',"index":' + str(call.index)
    if call.call_id is not None:
        head += ',"call_id":' + dumps(call.call_id)
    if call.name is not None:
        head += ',"name":' + dumps(call.name)
    return head + ',"arguments":' + dumps(arguments) + "}"


def encode_done(stream_id: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> str:
    return encode_terminal(stream_id, Done(finish_reason, Usage(prompt_tokens, completion_tokens)))
