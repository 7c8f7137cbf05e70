"""Server-sent events, decoded incrementally. No I/O happens here.

``SSEDecoder.feed(text)`` takes text as it arrives, in pieces of any size (a line may be
split anywhere, ``\\r\\n`` included), and returns the events completed by that piece. It
follows the HTML event-stream rules the OpenAI-compatible servers use: ``data:`` lines
are joined with newlines, an empty line dispatches the event, lines starting with ``:``
are comments (keep-alives), other fields are kept only for ``event``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"


class SSEError(ValueError):
    pass


class SSEDecoder:
    """``max_event_chars`` bounds what one event may hold, its partial line included: an
    upstream that never ends an event (or sends one endless line) cannot exhaust memory."""

    def __init__(self, *, max_event_chars: int = 1 << 20) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._data_chars = 0
        self._event = ""
        self._pending_cr = False
        self._max_event_chars = max_event_chars

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = False
        buffer = self._buffer + text if self._buffer else text
        if "\r" in buffer:
            # CR LF, CR and LF each end a line. A CR that ends the piece ends its line now,
            # and an LF that starts the next piece is its other half.
            self._pending_cr = buffer.endswith("\r")
            buffer = buffer.replace("\r\n", "\n").replace("\r", "\n")
        # One split for the whole piece, however many events it holds.
        lines = buffer.split("\n")
        self._buffer = lines.pop()
        events = [event for line in lines if (event := self._line(line)) is not None]
        if len(self._buffer) + self._data_chars > self._max_event_chars:
            raise SSEError(f"an event-stream event is larger than {self._max_event_chars} characters")
        return events

    @property
    def partial(self) -> bool:
        """Whether the stream stopped inside an event or a line (an event whose blank line
        never came is dropped, as the spec says)."""
        return bool(self._buffer or self._data)

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = Event("\n".join(self._data), self._event or "message")
            self._data = []
            self._data_chars = 0
            self._event = ""
            return event
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_chars += len(value) + 1
            if self._data_chars > self._max_event_chars:
                raise SSEError(f"an event-stream event is larger than {self._max_event_chars} characters")
        elif name == "event":
            self._event = value
        return None
