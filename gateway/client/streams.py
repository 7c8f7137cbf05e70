"""The client's bookkeeping of the generations it asked for, with no I/O: it takes the
frames that arrive and returns the frames to send, so it is testable without a network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.client.types import Part, ReasoningPart, TextPart, ToolCallPart
from gateway.wire.peer import encode_client_frame

# Error codes the client itself puts in a generation's terminal frame.
DISCONNECTED = "disconnected"  # the connection closed for good before the generation ended
STREAM_LOST = "stream_lost"  # the server no longer has this generation (its id was reused)


dumps = encode_client_frame


def _cancelled(stream_id: str) -> dict[str, Any]:
    """The terminal frame of a generation cancelled before the server heard of it."""
    return {"type": "done", "id": stream_id, "finish_reason": "cancelled",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0}}


@dataclass(eq=False)
class StreamState:
    """What the client knows of one generation it asked for."""

    id: str
    request: dict[str, Any]
    sent: bool = False  # the generate frame went out on some connection
    epoch: str | None = None  # from its start frame; None until started
    last_seq: int = -1
    resuming: bool = False  # a resume is in flight on the current connection
    cancel_requested: bool = False
    terminal: dict[str, Any] | None = None
    texts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    # Each tool call by index, assembled: {"id", "type", "function": {"name", "arguments"}}.
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def assembled_tool_calls(self) -> list[dict[str, Any]]:
        """The calls in the shape of an OpenAI assistant message's ``tool_calls``."""
        calls = []
        for index in sorted(self.tool_calls):
            call = self.tool_calls[index]
            calls.append({"id": call["id"], "type": "function",
                          "function": {"name": call["name"], "arguments": "".join(call["arguments"])}})
        return calls


@dataclass(frozen=True, slots=True)
class Delivery:
    """A part of a generation (``text`` is set for answer text), or its terminal frame."""

    stream: StreamState
    text: str | None = None
    terminal: dict[str, Any] | None = None
    part: Part | None = None


def _part(frame: dict[str, Any]) -> Part | None:
    """The part a delta frame carries, or None for a malformed one."""
    kind = frame.get("type")
    if kind == "tool_call":
        index, arguments = frame.get("index"), frame.get("arguments")
        call_id, name = frame.get("call_id"), frame.get("name")
        if (not isinstance(index, int) or not isinstance(arguments, str)
                or not isinstance(call_id, str | None) or not isinstance(name, str | None)):
            return None
        return ToolCallPart(index, arguments, call_id, name)
    text = frame.get("text")
    if not isinstance(text, str):
        return None
    return TextPart(text) if kind == "token" else ReasoningPart(text)


class Streams:
    """Turns inbound frames into deliveries and says what to send; never does I/O.

    Every method returns the frames the caller must send, in order. Guarantees: a delta
    frame (token, reasoning, tool_call: one ``seq`` space) whose ``seq`` is not beyond
    what was delivered is dropped, so a replay never delivers anything twice; a resume
    always asks for what follows the last delivered ``seq``, so nothing is skipped; every
    stream gets exactly one terminal delivery.
    """

    def __init__(self) -> None:
        self.streams: dict[str, StreamState] = {}
        self.connected = False

    def add(self, stream: StreamState) -> list[str]:
        if stream.id in self.streams:
            raise ValueError("a generation with this id is already running on this client")
        self.streams[stream.id] = stream
        if not self.connected:
            return []
        stream.sent = True
        return [dumps(stream.request)]

    def cancel(self, stream_id: str) -> tuple[list[Delivery], list[str]]:
        stream = self.streams.get(stream_id)
        if stream is None or stream.cancel_requested:
            return [], []
        stream.cancel_requested = True
        if not stream.sent:  # the server never heard of it
            return [self._end(stream, _cancelled(stream.id))], []
        return [], [dumps({"type": "cancel", "id": stream_id})] if self.connected else []

    def on_open(self) -> list[str]:
        """A new connection said hello: resume what was running, send what was waiting."""
        self.connected = True
        out: list[str] = []
        for stream in self.streams.values():
            if stream.sent:
                # Also for a generate with no start yet: the server may never have got it,
                # and a ``not_found`` answer makes it go out again (see ``on_frame``).
                stream.resuming = True
                out.append(dumps({"type": "resume", "id": stream.id, "after": stream.last_seq}))
                if stream.cancel_requested:
                    out.append(dumps({"type": "cancel", "id": stream.id}))
            else:
                stream.sent = True
                out.append(dumps(stream.request))
        return out

    def on_close(self, final: bool, reason: str = "") -> list[Delivery]:
        """The connection is gone; with ``final`` no other will come, so streams end here."""
        self.connected = False
        for stream in self.streams.values():
            stream.resuming = False
        if not final:
            return []
        message = "the connection closed before the generation ended" + (f": {reason}" if reason else "")
        return [self._end(stream, {"type": "error", "id": stream.id, "code": DISCONNECTED, "message": message})
                for stream in list(self.streams.values())]

    def on_frame(self, frame: dict[str, Any]) -> tuple[list[Delivery], list[str]]:
        kind = frame.get("type")
        frame_id = frame.get("id")
        stream = self.streams.get(frame_id) if isinstance(frame_id, str) else None
        if stream is None:
            return [], []
        if kind in ("token", "reasoning", "tool_call"):
            seq = frame.get("seq")
            part = _part(frame)
            if not isinstance(seq, int) or part is None or seq <= stream.last_seq:
                return [], []
            stream.last_seq = seq
            if isinstance(part, TextPart):
                stream.texts.append(part.text)
                return [Delivery(stream, text=part.text, part=part)], []
            if isinstance(part, ReasoningPart):
                stream.reasoning.append(part.text)
            else:
                call = stream.tool_calls.setdefault(part.index, {"id": "", "name": "", "arguments": []})
                call["id"] = call["id"] or part.call_id or ""
                call["name"] = call["name"] or part.name or ""
                call["arguments"].append(part.arguments)
            return [Delivery(stream, part=part)], []
        if kind == "start":
            epoch = frame.get("epoch")
            if frame.get("resumed"):
                stream.resuming = False
                if stream.epoch is not None and epoch != stream.epoch:
                    # Another generation under the same id: ours ended and expired meanwhile.
                    lost = {"type": "error", "id": stream.id, "code": STREAM_LOST,
                            "message": "the generation is no longer available on the server"}
                    return [self._end(stream, lost)], []
            if isinstance(epoch, str):
                stream.epoch = epoch
            return [], []
        if kind == "done":
            if stream.tool_calls:
                frame = {**frame, "tool_calls": stream.assembled_tool_calls()}
            return [self._end(stream, frame)], []
        if kind == "error":
            if stream.resuming and frame.get("code") == "not_found" and stream.epoch is None:
                # The generate never reached the server: send it now.
                stream.resuming = False
                if stream.cancel_requested:
                    return [self._end(stream, _cancelled(stream.id))], []
                return [], [dumps(stream.request)]
            if stream.cancel_requested and frame.get("code") == "not_found" and not stream.resuming:
                return [], []  # a cancel that crossed the terminal frame; that frame is on its way
            return [self._end(stream, frame)], []
        return [], []

    def _end(self, stream: StreamState, frame: dict[str, Any]) -> Delivery:
        stream.terminal = frame
        self.streams.pop(stream.id, None)
        return Delivery(stream, terminal=frame)
