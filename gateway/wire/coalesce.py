"""What a connection's send queue holds, and how a batch of it becomes frames.

Generations put typed items (``Token``, ``Start``, ``End``); the connection puts frames it
encoded itself (``Frame``). Everything is encoded here, when it is written, and
``coalesce`` merges each stream's consecutive waiting tokens into one frame: a slow client
gets fewer, larger frames without losing a token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.wire.events import Terminal
from gateway.wire.outbound import dumps, encode_start, encode_terminal, encode_token


@dataclass(eq=False, slots=True)
class StreamRef:
    """Identity of one generation in the outbound queue; its id JSON-encoded once."""

    id: str
    id_json: str

    @classmethod
    def of(cls, stream_id: str) -> StreamRef:
        return cls(stream_id, dumps(stream_id))


class Token(NamedTuple):
    stream: StreamRef
    seq: int
    text: str


class Start(NamedTuple):
    stream: StreamRef
    epoch: str
    room: str | None = None
    resumed: bool = False


class End(NamedTuple):
    stream: StreamRef
    terminal: Terminal


class Frame(NamedTuple):
    """An encoded frame; ``stream`` is set when it belongs to a generation."""

    stream: StreamRef | None
    text: str


OutItem = Token | Start | End | Frame


def encode_item(item: OutItem) -> str:
    if isinstance(item, Token):
        return encode_token(item.stream.id_json, item.seq, item.text)
    if isinstance(item, Frame):
        return item.text
    if isinstance(item, Start):
        return encode_start(item.stream.id, item.epoch, resumed=item.resumed, room=item.room)
    return encode_terminal(item.stream.id, item.terminal)


class Coalesced(NamedTuple):
    frames: list[str]
    tokens: int
    merged_frames: int


def coalesce(items: Sequence[OutItem] | Iterable[OutItem]) -> Coalesced:
    """Encode queued items, merging each stream's consecutive waiting tokens into one frame.

    Guarantees: within a stream, frames keep their order, every token appears exactly once,
    and a frame's ``seq`` is that of the last token it carries. A stream's start frame comes
    before its tokens and its terminal frame after them, because any other item of the
    stream closes its open run.
    """
    out: list[str | list[Any]] = []
    open_runs: dict[int, list[Any]] = {}  # id(StreamRef) -> [stream, last_seq, [texts]]
    tokens = 0
    runs = 0
    for item in items:
        if type(item) is Token:
            tokens += 1
            run = open_runs.get(id(item.stream))
            if run is None:
                run = [item.stream, item.seq, [item.text]]
                open_runs[id(item.stream)] = run
                out.append(run)
                runs += 1
            else:
                run[1] = item.seq
                run[2].append(item.text)
        else:
            if item.stream is not None:
                open_runs.pop(id(item.stream), None)
            out.append(encode_item(item))
    frames: list[str] = []
    for entry in out:
        if isinstance(entry, str):
            frames.append(entry)
        else:
            stream, seq, texts = entry
            frames.append(encode_token(stream.id_json, seq, texts[0] if len(texts) == 1 else "".join(texts)))
    return Coalesced(frames, tokens, tokens - runs)
