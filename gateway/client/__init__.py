"""The gateway's clients: ``GatewayClient``, an async Python client on the ``websockets``
library; ``gateway chat`` (``chat``), a terminal chat on it; and ``static/``, the browser SDK.

``GatewayClient`` keeps one connection open and hides drops from its callers: it answers
the server's pings, reconnects with exponential backoff and jitter (1 s up to 30 s, never
after a close that retrying cannot fix, such as 1008, or 4001 without a token callable),
and on every reconnect resumes each running generation from the last ``seq`` it received.
Guarantee to a caller iterating a ``Generation``: each token's text is yielded exactly
once and in order, across any number of reconnects, or the generation ends with an
``error`` terminal frame saying why not.

    async with GatewayClient("ws://127.0.0.1:8000/ws", token) as client:
        answer = await client.generate("Hello there", max_tokens=64)
        async for text in answer:
            print(text, end="", flush=True)
        terminal = await answer.result()

``answer.parts()`` yields every part typed (``TextPart``, ``ReasoningPart``,
``ToolCallPart``), ``answer.reasoning`` is the reasoning so far and ``answer.tool_calls`` the
tool calls, assembled; a ``done`` terminal frame carries them too, as ``tool_calls``.

The bookkeeping of streams (``Streams``) does no I/O: it takes the frames that arrive and
returns the frames to send, so it is testable without a network.
"""

from gateway.client.connection import GatewayClient, backoff_delay, connect
from gateway.client.generation import Generation
from gateway.client.streams import DISCONNECTED, STREAM_LOST, Delivery, Streams, StreamState
from gateway.client.types import GatewayError, Part, ReasoningPart, StateChange, TextPart, ToolCallPart
from gateway.wire.codes import CLOSE_RULES, describe_close, should_reconnect

# What each close code means, for a caller to show: a view of the protocol's one table.
CLOSE_REASONS: dict[int, str] = {int(code): rule.meaning for code, rule in CLOSE_RULES.items()}

__all__ = [
    "CLOSE_REASONS",
    "DISCONNECTED",
    "STREAM_LOST",
    "Delivery",
    "GatewayClient",
    "GatewayError",
    "Generation",
    "Part",
    "ReasoningPart",
    "StateChange",
    "StreamState",
    "Streams",
    "TextPart",
    "ToolCallPart",
    "backoff_delay",
    "connect",
    "describe_close",
    "should_reconnect",
]
