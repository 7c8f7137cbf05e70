"""What a connection's send queue holds, and how a batch of it becomes frames.

Generations put typed items (``Token``, ``Reasoning``, ``ToolCallFragment``, ``Start``,
``End``); the connection puts frames it encoded itself (``Frame``). Everything is encoded
here, when it is written, and ``coalesce`` merges each stream's consecutive waiting deltas
of one kind into one frame: a slow client gets fewer, larger frames without losing a delta.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.wire.events import REASONING, TEXT, DeltaKind, Terminal, ToolCallDelta
from gateway.wire.outbound import (
    dumps,
    encode_reasoning,
    encode_start,
    encode_terminal,
    encode_token,
    encode_tool_call,
)


@dataclass(eq=False, slots=True)
class StreamRef:
    """Identity of one generation in the outbound queue; its id JSON-encoded once."""

    id: str
    id_json: str

    @classmethod
    def of(cls, stream_id: str) -> StreamRef:
        return cls(stream_id, dumps(stream_id))


class Token(NamedTuple):
    """A delta of answer text."""

    stream: StreamRef
    seq: int
    text: str


class Reasoning(NamedTuple):
    """A delta of the model's reasoning."""

    stream: StreamRef
    seq: int
    text: str


class ToolCallFragment(NamedTuple):
    """A fragment of a tool call's arguments; ``call`` carries the id and the name on the
    first fragment of its index."""

    stream: StreamRef
    seq: int
    call: ToolCallDelta
    arguments: str


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


Delta = Token | Reasoning | ToolCallFragment
OutItem = Token | Reasoning | ToolCallFragment | Start | End | Frame
DELTA_TYPES = (Token, Reasoning, ToolCallFragment)


def delta_item(stream: StreamRef, seq: int, text: str, kind: DeltaKind) -> Delta:
    """The queue item of one delta of a generation, by its kind."""
    if kind == TEXT:
        return Token(stream, seq, text)
    if kind == REASONING:
        return Reasoning(stream, seq, text)
    assert isinstance(kind, ToolCallDelta)
    return ToolCallFragment(stream, seq, kind, text)


def delta_runs(first_seq: int, texts: Sequence[str], kinds: Sequence[DeltaKind] | None
               ) -> list[tuple[int, str, DeltaKind]]:
    """Consecutive deltas as runs that coalescing would merge: (last seq, text, kind), a run
    per change of kind or of tool-call index, and one starting at each call's first
    fragment. Without ``kinds`` every delta is answer text: one run."""
    if not texts:
        return []
    if kinds is None:
        return [(first_seq + len(texts) - 1, "".join(texts), TEXT)]
    runs: list[tuple[int, str, DeltaKind]] = []
    pieces: list[str] = []
    run_kind: DeltaKind = TEXT
    run_key: object = None
    last = first_seq - 1
    for offset, (text, kind) in enumerate(zip(texts, kinds, strict=True)):
        if isinstance(kind, ToolCallDelta):
            key: object = None if kind.call_id is not None or kind.name is not None else kind.index
        else:
            key = kind
        if pieces and (key is None or key != run_key):
            runs.append((last, "".join(pieces), run_kind))
            pieces = []
        if not pieces:
            run_kind = kind
            run_key = kind.index if isinstance(kind, ToolCallDelta) else kind
        pieces.append(text)
        last = first_seq + offset
    runs.append((last, "".join(pieces), run_kind))
    return runs


def delta_kind(item: Delta) -> DeltaKind:
    if type(item) is Token:
        return TEXT
    if type(item) is Reasoning:
        return REASONING
    assert isinstance(item, ToolCallFragment)
    return item.call


def delta_text(item: Delta) -> str:
    return item.arguments if isinstance(item, ToolCallFragment) else item.text


def encode_item(item: OutItem) -> str:
    if isinstance(item, Token):
        return encode_token(item.stream.id_json, item.seq, item.text)
    if isinstance(item, Reasoning):
        return encode_reasoning(item.stream.id_json, item.seq, item.text)
    if isinstance(item, ToolCallFragment):
        return encode_tool_call(item.stream.id_json, item.seq, item.call, item.arguments)
    if isinstance(item, Frame):
        return item.text
    if isinstance(item, Start):
        return encode_start(item.stream.id, item.epoch, resumed=item.resumed, room=item.room)
    return encode_terminal(item.stream.id, item.terminal)


class Coalesced(NamedTuple):
    frames: list[str]
    tokens: int  # deltas of every kind
    merged_frames: int


def _run_key(item: Delta) -> object:
    """Deltas merge only with their stream's previous delta of the same key: the kind, and
    for a tool call its index. None: a fragment that opens a call, which joins no run."""
    if isinstance(item, ToolCallFragment):
        call = item.call
        return None if call.call_id is not None or call.name is not None else call.index
    return type(item)


def coalesce(items: Sequence[OutItem] | Iterable[OutItem]) -> Coalesced:
    """Encode queued items, merging each stream's consecutive waiting deltas into one frame.

    Guarantees: within a stream, frames keep their order, every delta appears exactly once,
    and a frame's ``seq`` is that of the last delta it carries. Only adjacent deltas of the
    same kind merge (for tool calls, of the same index), so kinds are never reordered. A
    stream's start frame comes before its deltas and its terminal frame after them,
    because any other item of the stream closes its open run.
    """
    out: list[str | list[Any]] = []
    # id(StreamRef) -> [first item, last_seq, [texts], key]
    open_runs: dict[int, list[Any]] = {}
    tokens = 0
    runs = 0
    for item in items:
        if isinstance(item, (Token, Reasoning, ToolCallFragment)):
            tokens += 1
            stream_key = id(item.stream)
            run = open_runs.get(stream_key)
            key = _run_key(item)
            if run is not None and key is not None and run[3] == key:
                run[1] = item.seq
                run[2].append(delta_text(item))
            else:
                if key is None:
                    assert isinstance(item, ToolCallFragment)
                    key = item.call.index
                run = [item, item.seq, [delta_text(item)], key]
                open_runs[stream_key] = run
                out.append(run)
                runs += 1
        else:
            if item.stream is not None:
                open_runs.pop(id(item.stream), None)
            out.append(encode_item(item))
    frames: list[str] = []
    for entry in out:
        if isinstance(entry, str):
            frames.append(entry)
            continue
        first, seq, texts, _ = entry
        text = texts[0] if len(texts) == 1 else "".join(texts)
        stream = first.stream
        if type(first) is Token:
            frames.append(encode_token(stream.id_json, seq, text))
        elif type(first) is Reasoning:
            frames.append(encode_reasoning(stream.id_json, seq, text))
        else:
            frames.append(encode_tool_call(stream.id_json, seq, first.call, text))
    return Coalesced(frames, tokens, tokens - runs)
