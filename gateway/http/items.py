"""What an HTTP response makes of a generation's typed items: server-sent events
(``sse_events``) or, collected, a ``chat.completion`` object (``collect``). Items come
from a ``ResponseSink`` (a generation on this process) or from the stream store (a
generation anywhere, or finished), as lists of whatever is waiting."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.wire.coalesce import End, OutItem, Reasoning, Start, Token, ToolCallFragment
from gateway.wire.events import Failed, Terminal
from gateway.wire.openai_http import DONE_EVENT, PING_EVENT, ChunkEncoder, error_event

ItemSource = AsyncIterator[list[OutItem]]  # an empty list: nothing came for a heartbeat interval


def _merged(items: list[OutItem]) -> list[OutItem]:
    """Adjacent deltas of one kind merged, as the socket's coalescing does: a slow reader
    gets fewer, larger events, each with the seq of the last delta it carries."""
    out: list[OutItem] = []
    for item in items:
        last = out[-1] if out else None
        if type(item) is Token and type(last) is Token:
            out[-1] = Token(item.stream, item.seq, last.text + item.text)
        elif type(item) is Reasoning and type(last) is Reasoning:
            out[-1] = Reasoning(item.stream, item.seq, last.text + item.text)
        elif (type(item) is ToolCallFragment and type(last) is ToolCallFragment
              and item.call.call_id is None and item.call.name is None and item.call.index == last.call.index):
            out[-1] = ToolCallFragment(item.stream, item.seq, last.call, last.arguments + item.arguments)
        else:
            out.append(item)
    return out


async def sse_events(source: ItemSource, encoder: ChunkEncoder, *, include_usage: bool,
                     send_role: bool) -> AsyncIterator[bytes]:
    """The events of one stream: the role chunk (on ``Start``, unless ``send_role`` is
    False: a resume after some delta), one chunk per run of deltas with its last seq as the
    event id, then the finish chunk, the usage chunk when asked, and ``[DONE]``; or, when
    the generation failed, one error event and no ``[DONE]``. ``: ping`` when nothing came
    for an interval."""
    async with contextlib.aclosing(source) as items_source:  # type: ignore[type-var]
        async for events in _sse_events(items_source, encoder, include_usage, send_role):
            yield events


async def _sse_events(source: ItemSource, encoder: ChunkEncoder, include_usage: bool,
                      send_role: bool) -> AsyncIterator[bytes]:
    async for items in source:
        if not items:
            yield PING_EVENT
            continue
        out: list[bytes] = []
        for item in _merged(items):
            if type(item) is Token:
                out.append(encoder.text(item.seq, item.text))
            elif type(item) is Reasoning:
                out.append(encoder.reasoning(item.seq, item.text))
            elif type(item) is ToolCallFragment:
                out.append(encoder.tool_call(item.seq, item.call, item.arguments))
            elif type(item) is Start:
                if send_role:
                    out.append(encoder.role())
                    send_role = False
            elif type(item) is End:
                out.extend(_ending(encoder, item.terminal, include_usage))
                yield b"".join(out)
                return
        if out:
            yield b"".join(out)


def _ending(encoder: ChunkEncoder, terminal: Terminal, include_usage: bool) -> list[bytes]:
    if isinstance(terminal, Failed):
        return [error_event(terminal)]
    out = [encoder.finish(terminal.finish_reason)]
    if include_usage:
        out.append(encoder.usage(terminal.usage))
    out.append(DONE_EVENT)
    return out


async def collect(source: ItemSource) -> tuple[str, str, list[dict[str, Any]], Terminal | None]:
    """A whole answer: its content, reasoning, tool calls (in the shape an assistant
    message sends them back) and how it ended (None when the source ended without it)."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    async with contextlib.aclosing(source) as items_source:  # type: ignore[type-var]
        async for items in items_source:
            for item in items:
                if type(item) is Token:
                    content.append(item.text)
                elif type(item) is Reasoning:
                    reasoning.append(item.text)
                elif type(item) is ToolCallFragment:
                    call = calls.setdefault(item.call.index, {"id": "", "type": "function",
                                                              "function": {"name": "", "arguments": ""}})
                    if item.call.call_id is not None:
                        call["id"] = item.call.call_id
                    if item.call.name is not None:
                        call["function"]["name"] = item.call.name
                    call["function"]["arguments"] += item.arguments
                elif type(item) is End:
                    return "".join(content), "".join(reasoning), [calls[i] for i in sorted(calls)], item.terminal
    return "".join(content), "".join(reasoning), [calls[i] for i in sorted(calls)], None

