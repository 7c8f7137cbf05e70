"""Test helpers: real servers (in a thread or a subprocess) and tokens."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import jwt
from websockets.asyncio.client import ClientConnection, connect

from config import Settings
from config.backends import flat_prefix, settings_model_for
from gateway.app import create_app
from gateway.transport.uvicorn import GatewayServer, uvicorn_config

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789abcdef0123456789"


# Backend settings every test gets unless it says otherwise: no pauses.
BACKEND_TEST_DEFAULTS: dict[str, Any] = {"echo_delay_ms": 0, "synthetic_ttft_ms": 0}


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test: no ``.env``, quiet logs, no pings, no pauses, no resume grace.

    A keyword is a ``Settings`` field, or a setting of the chosen backend named as in the
    environment without ``GATEWAY_`` (``synthetic_tokens_per_s`` for
    ``GATEWAY_SYNTHETIC_TOKENS_PER_S``): those go into ``backend_settings`` as the fields of
    the backend's model (``tokens_per_s``), so a test reads like the environment it stands
    for. A keyword that is neither is refused. A test may pass ``backend_settings`` (the
    model, or a dict of its fields) instead, which is then used as is.
    """
    fields = Settings.model_fields
    values: dict[str, Any] = {
        "jwt_secret": SECRET,
        "ws_ping_interval_s": 0,
        "log_level": "warning",
        # Most tests check that a disconnect cancels at once; resume tests set a grace.
        "resume_grace_s": 0,
        **{key: value for key, value in overrides.items() if key in fields},
    }
    named = {key: value for key, value in overrides.items() if key not in fields}
    if "backend_settings" not in values:
        values["backend_settings"] = _backend_fields(values.get("backend", fields["backend"].default), named) or None
    elif named:
        raise TypeError(f"make_settings: {', '.join(named)}: not Settings fields, and backend_settings is given")
    return Settings(_env_file=None, **values)


def _backend_fields(backend: str, named: dict[str, Any]) -> dict[str, Any]:
    """``named`` and the test defaults as fields of the backend's settings model
    (``synthetic_tokens_per_s`` becomes ``tokens_per_s``)."""
    model = settings_model_for(backend)
    prefix = flat_prefix(model) if model is not None else ""
    own: dict[str, Any] = {}
    for key, value in {**BACKEND_TEST_DEFAULTS, **named}.items():
        if model is not None and key.startswith(prefix) and key[len(prefix):] in model.model_fields:
            own[key[len(prefix):]] = value
        elif key in named:
            raise TypeError(f"make_settings: {key} is neither a Settings field nor a setting of backend {backend!r}")
    return own


def mint(sub: str = "alice", *, ttl: float = 3600, secret: str = SECRET, algorithm: str = "HS256",
         **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret, algorithm=algorithm)


class ServerThread:
    """A real uvicorn server (the gateway's own GatewayServer) on an ephemeral port, in a
    thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.hub = self.app.state.hub
        config = uvicorn_config(self.app, settings, host="127.0.0.1", port=0, log_config=None)
        self.server = GatewayServer(config, self.hub)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        return metric_value(self.app.state.hub.metrics.render().decode(), name)


class Serve(Protocol):
    """The ``serve`` fixture: starts a :class:`ServerThread` for ``settings``, or for
    ``make_settings(**overrides)``, and stops it when the test ends."""

    def __call__(self, settings: Settings | None = None, /, **overrides: Any) -> ServerThread: ...


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.asynccontextmanager
async def ws_connect(url: str, token: str | None = None, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    headers = kwargs.pop("additional_headers", {}) or {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    # A generous handshake timeout: these machines are shared and other suites may be running.
    async with connect(url, additional_headers=headers, open_timeout=15, ping_interval=None, **kwargs) as ws:
        yield ws


class Connected(ClientConnection):
    """A client connection that has received its hello frame, kept as ``hello``."""

    hello: dict[str, Any]


@contextlib.asynccontextmanager
async def connected(server: ServerThread | ServerProcess, token: str | None = None,
                    **kwargs: Any) -> AsyncIterator[Connected]:
    """Connects to ``server`` as :func:`ws_connect` does and receives the hello frame."""
    async with ws_connect(server.url, token, create_connection=Connected, **kwargs) as ws:
        assert isinstance(ws, Connected)
        ws.hello = await recv_json(ws)
        yield ws


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    import anyio

    with anyio.fail_after(timeout):
        message = await ws.recv()
    assert isinstance(message, str)
    data = json.loads(message)
    assert isinstance(data, dict)
    return data


Predicate = Callable[[dict[str, Any]], bool]


async def recv_until(ws: ClientConnection, predicate: Predicate, timeout: float = 10.0,
                     skip_pings: bool = True) -> list[dict[str, Any]]:
    """Receive frames until one satisfies ``predicate``; return them all (that one last)."""
    import anyio

    frames: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        while True:
            frame = await recv_json(ws, timeout)
            if skip_pings and frame.get("type") == "ping":
                continue
            frames.append(frame)
            if predicate(frame):
                return frames


def terminal_for(stream_id: str) -> Predicate:
    return lambda f: f.get("id") == stream_id and f.get("type") in ("done", "error")


def stream_text(frames: list[dict[str, Any]], stream_id: str) -> str:
    return "".join(f["text"] for f in frames if f.get("type") == "token" and f.get("id") == stream_id)


class ServerProcess:
    """``python -m gateway serve`` in a subprocess, with ``env`` as GATEWAY_* settings."""

    def __init__(self, env: dict[str, str], *, args: tuple[str, ...] = ()) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.env.setdefault("GATEWAY_PORT", "0")
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self._started = threading.Event()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"Uvicorn running on http://[^:]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._started.set()
        self._started.set()

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", *self.args],
            env=self.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=str(ROOT),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._started.wait(30) or not self.port:
            self.stop()
            raise RuntimeError("gateway process did not start:\n" + "".join(self.lines))
        return self

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def rss_kb(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


class RawClient:
    """A WebSocket client on a blocking socket that reads only when told to.

    It speaks the protocol through the websockets library's sans-I/O ``ClientProtocol``, so
    a test can stop reading (a stalled or vanished client) while the TCP connection stays
    open, which no ordinary client library allows.
    """

    def __init__(self, port: int, token: str, *, recv_buffer: int = 32768) -> None:
        import socket

        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/ws"), max_size=None)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        request = self.protocol.connect()
        request.headers["Authorization"] = f"Bearer {token}"
        self.protocol.send_request(request)
        self._flush()
        self.frames: list[dict[str, Any]] = []
        while not self.frames:  # the handshake response, then hello
            self.read_some()

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.sock.sendall(chunk)

    def read_some(self, size: int = 65536) -> None:
        from websockets.frames import Frame as WsFrame
        from websockets.frames import Opcode

        data = self.sock.recv(size)
        if not data:
            self.protocol.receive_eof()
        else:
            self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, WsFrame) and event.opcode is Opcode.TEXT:
                self.frames.append(json.loads(bytes(event.data)))
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def send_json(self, obj: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(obj).encode())
        self._flush()

    def close(self) -> None:
        self.sock.close()
