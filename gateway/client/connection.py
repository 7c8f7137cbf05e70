"""``GatewayClient``: one connection kept open across drops, the reconnect loop with its
backoff, and the resume of every running generation on each new connection."""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import secrets
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from gateway.client.generation import Generation
from gateway.client.streams import Delivery, Streams, StreamState, dumps
from gateway.client.types import AuthMode, GatewayError, State, StateChange, TokenSource
from gateway.logs import RedactingFilter
from gateway.wire import BEARER_SUBPROTOCOL_PREFIX, PROTOCOL
from gateway.wire.codes import CloseCode, describe_close, should_reconnect
from gateway.wire.peer import decode_server_frame

logger = logging.getLogger("gateway.client")
# The websockets library logs through this logger too (it is passed to connect), and at
# DEBUG it logs the handshake's headers, URL and subprotocols, and every frame: credentials
# are redacted from every record, and data frames (prompts, answers) are not logged.
logger.addFilter(RedactingFilter())

MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# Without any frame for this many heartbeat intervals, the connection is taken as dead.
HEARTBEAT_MISSES = 3


def backoff_delay(attempt: int, *, minimum: float = MIN_BACKOFF_S, maximum: float = MAX_BACKOFF_S,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect ``attempt`` (0 for the first): uniform between
    ``minimum`` and an exponentially growing ceiling capped at ``maximum``. The jitter
    spreads the reconnects of many clients that lost the same server."""
    ceiling = min(maximum, minimum * 2 ** (min(attempt, 30) + 1))
    return (rng or random).uniform(minimum, ceiling)


def new_stream_id() -> str:
    return "py-" + secrets.token_hex(8)


class GatewayClient:
    """See ``gateway.client``. Use as ``async with GatewayClient(url, token) as client``.

    ``token`` may be a function (sync or async) so that each reconnect can use a fresh one.
    ``on_state`` is called with a ``StateChange`` on every change of ``state``; ``on_error``
    with each error frame that belongs to no generation.
    """

    def __init__(
        self,
        url: str,
        token: TokenSource | None = None,
        *,
        auth: AuthMode = "subprotocol",
        reconnect: bool = True,
        min_backoff_s: float = MIN_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        open_timeout_s: float = 10.0,
        on_state: Callable[[StateChange], None] | None = None,
        on_error: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self.auth = auth
        self.reconnect = reconnect
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.open_timeout_s = open_timeout_s
        self.on_state = on_state
        self.on_error = on_error
        self.state: State = "connecting"
        self.hello: dict[str, Any] | None = None
        self.opens = 0  # connections that said hello, the first one included
        self.last_close: tuple[int | None, str] | None = None
        self._streams = Streams()
        self._generations: dict[str, Generation] = {}
        self._ws: ClientConnection | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._state_changed: anyio.Event | None = None
        self._send_lock: anyio.Lock | None = None
        self.failure: BaseException | None = None

    # Lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> GatewayClient:
        self._state_changed = anyio.Event()
        self._send_lock = anyio.Lock()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
        assert self._task_group is not None
        await self._task_group.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Cancel what is still running, close with 1000 and stop reconnecting."""
        if self._closing:
            return
        self._closing = True
        ws = self._ws
        if ws is not None:
            with anyio.move_on_after(2), contextlib.suppress(ConnectionClosed, OSError):
                for stream_id in list(self._streams.streams):
                    await ws.send(dumps({"type": "cancel", "id": stream_id}))
                await ws.close(1000, "client closed")
        self._finish_all("the client was closed")
        self._set_state(StateChange("closed", code=1000))
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    @property
    def closed(self) -> bool:
        """True once the client stopped for good (closed by the caller or by the server)."""
        return self._closing

    async def wait_open(self) -> dict[str, Any]:
        """Wait until a connection is open; returns its hello. Raises ``GatewayError`` when
        the client closed for good instead."""
        while self.state != "open":
            if self.state == "closed":
                raise GatewayError(self._closed_message())
            await self.state_changed()
        assert self.hello is not None
        return self.hello

    async def state_changed(self) -> None:
        """Wait for the next change of ``state`` (or of the connection behind it)."""
        assert self._state_changed is not None, "use the client as an async context manager"
        await self._state_changed.wait()

    def _closed_message(self) -> str:
        if self.last_close is None:
            return "the client is closed"
        return "connection closed: " + describe_close(*self.last_close)

    # Generations ------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[dict[str, str]] | None = None,
        id: str | None = None,
        **options: Any,
    ) -> Generation:
        """Start a generation (sent now, or as soon as a connection is open). ``options``
        are the generate fields: ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``model``."""
        if self._closing:
            raise GatewayError(self._closed_message())
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of prompt and messages")
        stream_id = id or new_stream_id()
        frame: dict[str, Any] = {"type": "generate", "id": stream_id}
        if prompt is not None:
            frame["prompt"] = prompt
        else:
            frame["messages"] = [dict(m) for m in messages or ()]
        frame.update({k: v for k, v in options.items() if v is not None})
        state = StreamState(stream_id, frame)
        generation = Generation(state, self.cancel)
        out = self._streams.add(state)
        self._generations[stream_id] = generation
        await self._send_all(out)
        return generation

    async def cancel(self, stream_id: str) -> None:
        """Ask the server to stop a generation; its terminal frame comes as usual
        (``done`` with ``finish_reason`` ``cancelled``)."""
        deliveries, out = self._streams.cancel(stream_id)
        self._deliver(deliveries)
        await self._send_all(out)

    @property
    def running(self) -> list[Generation]:
        return [self._generations[i] for i in self._streams.streams if i in self._generations]

    # Connection loop --------------------------------------------------------------------

    async def _token_value(self) -> str | None:
        token = self._token
        if token is None or isinstance(token, str):
            return token
        value = token()
        if inspect.isawaitable(value):
            value = await value
        return str(value)

    async def _open(self) -> ClientConnection:
        token = await self._token_value()
        url = self.url
        headers: dict[str, str] = {}
        subprotocols = [Subprotocol(PROTOCOL)]
        if token is not None:
            if self.auth == "subprotocol":
                subprotocols.append(Subprotocol(BEARER_SUBPROTOCOL_PREFIX + token))
            elif self.auth == "header":
                headers["Authorization"] = f"Bearer {token}"
            elif self.auth == "query":
                parts = urlsplit(url)
                query = [*parse_qsl(parts.query), ("token", token)]
                url = urlunsplit(parts._replace(query=urlencode(query)))
        ws = await ws_connect(url, subprotocols=subprotocols, additional_headers=headers,
                              open_timeout=self.open_timeout_s, max_size=2**24, logger=logger)
        if token is not None and self.auth == "message":
            await ws.send(dumps({"type": "auth", "token": token}))
        return ws

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            code: int | None = None
            reason = ""
            opened = False
            fatal = False
            try:
                ws = await self._open()
            except InvalidStatus as exc:
                status = exc.response.status_code
                code, reason = CloseCode.POLICY if status in (401, 403) else None, f"HTTP {status}"
                fatal = status in (401, 403)
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                reason = type(exc).__name__
            except InvalidURI as exc:
                self.failure = exc
                code, reason, fatal = None, "invalid URL", True
            else:
                self._ws = ws
                try:
                    opened = await self._serve(ws)
                finally:
                    self._ws = None
                    self._streams.connected = False
                    with anyio.CancelScope(shield=True):
                        await _discard(ws)
                code, reason = ws.close_code, ws.close_reason or ""
                if self.closed:
                    return
            if opened:
                attempt = 0
            self.last_close = (code, reason)
            # An expired token (4001) is worth a reconnect only with a token callable to get
            # a fresh one from; the same string would be refused. Then the answers resume.
            renewable = code != CloseCode.TOKEN_EXPIRED or callable(self._token)
            final = fatal or not self.reconnect or not should_reconnect(code) or not renewable or self._closing
            self._deliver(self._streams.on_close(final, describe_close(code, reason) if final else ""))
            if final:
                self._closing = True
                self._finish_all(describe_close(code, reason))
                self._set_state(StateChange("closed", code=code, reason=reason, opened=opened))
                return
            delay = backoff_delay(attempt, minimum=self.min_backoff_s, maximum=self.max_backoff_s)
            attempt += 1
            self._set_state(StateChange("reconnecting", code=code, reason=reason, delay_s=delay, opened=opened))
            await anyio.sleep(delay)
            self._set_state(StateChange("connecting"))

    async def _serve(self, ws: ClientConnection) -> bool:
        """Read frames until the connection ends; True when it got as far as the hello."""
        opened = False
        try:
            with anyio.fail_after(self.open_timeout_s):
                hello = decode_server_frame(await ws.recv())
            if hello is None or hello.get("type") != "hello":
                await ws.close(1002, "expected hello")
                return False
            self.hello = hello
            opened = True
            self.opens += 1
            heartbeat = hello.get("heartbeat_s")
            silence = max(float(heartbeat) * HEARTBEAT_MISSES, 5.0) if isinstance(heartbeat, int | float) else None
            out = self._streams.on_open()
            self._set_state(StateChange("open"))
            await self._send_all(out)
            while True:
                with anyio.move_on_after(silence) as quiet:
                    message = await ws.recv()
                if quiet.cancelled_caught:
                    # A half-open connection: nothing, not even the server's ping. A close
                    # handshake would wait for a peer that is gone: ``_discard`` aborts it.
                    break
                frame = decode_server_frame(message)
                if frame is not None:
                    await self._on_frame(ws, frame)
        except (ConnectionClosed, TimeoutError, OSError):
            pass
        return opened

    async def _on_frame(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ping":
            await ws.send('{"type":"pong"}')
            return
        if kind == "error" and frame.get("id") is None:
            if self.on_error is not None:
                self.on_error(frame)
            return
        deliveries, out = self._streams.on_frame(frame)
        self._deliver(deliveries)
        await self._send_all(out)

    async def _send_all(self, frames: list[str]) -> None:
        ws = self._ws
        if not frames or ws is None or not self._streams.connected:
            return
        assert self._send_lock is not None
        # A send that fails because the connection just dropped is retried by the resume
        # logic of the next connection (the stream is marked sent, so it is resumed).
        with contextlib.suppress(ConnectionClosed, OSError):
            async with self._send_lock:
                for text in frames:
                    await ws.send(text)

    def _deliver(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            generation = self._generations.get(delivery.stream.id)
            if generation is None or generation._state is not delivery.stream:
                continue
            generation._deliver(delivery)
            if delivery.terminal is not None:
                del self._generations[delivery.stream.id]

    def _finish_all(self, reason: str) -> None:
        self._deliver(self._streams.on_close(final=True, reason=reason))

    def _set_state(self, change: StateChange) -> None:
        if change.state == self.state and change.state in ("closed", "open"):
            return
        self.state = change.state
        if self._state_changed is not None:
            self._state_changed.set()
            self._state_changed = anyio.Event()
        if self.on_state is not None:
            self.on_state(change)


async def _discard(ws: ClientConnection) -> None:
    """Close a connection that is done with, without waiting long for a peer that may be gone."""
    with anyio.move_on_after(1.0), contextlib.suppress(ConnectionClosed, OSError):
        await ws.close(1000, "")
    if ws.transport is not None and not ws.transport.is_closing():
        ws.transport.abort()


def connect(url: str, token: TokenSource | None = None, **options: Any) -> GatewayClient:
    """``async with connect(url, token) as client``: a ``GatewayClient``."""
    return GatewayClient(url, token, **options)

