"""The incremental server-sent-events decoder: bytes in, events out, no I/O."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backends.sse import Event, SSEDecoder, SSEError

STREAM = (
    ": a comment\n"
    "data: one\n\n"
    "event: update\r\n"
    "data: two\r\n"
    "data:three\r\n\r\n"
    "id: 7\rretry: 10\rdata: four\r\r"
    "data\n\n"
    "data: [DONE]\n\n"
    "data: never dispatched"
)
EVENTS = [Event("one"), Event("two\nthree", "update"), Event("four"), Event(""), Event("[DONE]")]


def decode(pieces: list[str]) -> tuple[list[Event], bool]:
    decoder = SSEDecoder()
    events = [event for piece in pieces for event in decoder.feed(piece)]
    return events, decoder.partial


def test_whole_stream() -> None:
    events, partial = decode([STREAM])
    assert events == EVENTS and partial


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    pieces = [STREAM[a:b] for a, b in itertools.pairwise(points)]
    assert decode(pieces) == (EVENTS, True)


def test_clean_end_is_not_partial() -> None:
    assert decode(["data: x\n\n"]) == ([Event("x")], False)


def test_overlong_line_is_refused() -> None:
    decoder = SSEDecoder(max_event_chars=16)
    with pytest.raises(SSEError):
        decoder.feed("data: " + "x" * 32)


def test_an_event_of_many_short_lines_is_bounded_too() -> None:
    decoder = SSEDecoder(max_event_chars=64)
    assert decoder.feed("data: " + "x" * 40 + "\n\n") == [Event("x" * 40)]  # under the limit: fine
    with pytest.raises(SSEError):
        for _ in range(20):  # an event that never ends, one short line at a time
            decoder.feed("data: abcdefgh\n")
