"""A minimal WebSocket client for load generation: one ``asyncio.Protocol``, no framework.

The load generator has one core against the server's one, so the client must cost much
less per frame than the server. Library clients run a generator-based parser per frame;
this one parses every frame that arrived in one ``data_received`` call in a single loop,
hands text payloads over as ``bytes`` (no decode, no JSON) and stamps them with one clock
read per call. It speaks only what the benchmarks need: unmasked frames from the server,
masked text frames to it, answers to pings and closes, no extensions.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Callable

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(Exception):
    pass


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 section 5.3)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n:
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return header + mask + payload


class WSClientProtocol(asyncio.Protocol):
    """Calls ``on_text(payload, now)`` for each text message; ``now`` is ``time.monotonic()``
    when the bytes carrying it were read."""

    def __init__(self, request: bytes, on_text: Callable[[bytes, float], None]) -> None:
        self._request = request
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self._buf = bytearray()
        self._handshaking = True
        self._fragments: list[bytes] = []

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(HandshakeError(f"connection lost during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code if self.close_code is not None else 1006)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._handshaking:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            self._handshaking = False
            if b" 101 " not in status:
                self.upgraded.set_exception(HandshakeError(status.decode("latin-1")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded.set_result(None)
        now = time.monotonic()
        pos = 0
        size = len(buf)
        on_text = self.on_text
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            payload = bytes(buf[start:end])
            pos = end
            opcode = b0 & 0x0F
            if opcode == OP_TEXT and b0 & 0x80:
                on_text(payload, now)
            elif opcode in (OP_TEXT, OP_CONT):
                self._fragments.append(payload)
                if b0 & 0x80:
                    on_text(b"".join(self._fragments), now)
                    self._fragments.clear()
            elif opcode == OP_PING:
                self.send_frame(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.send_frame(OP_CLOSE, payload[:2])
                assert self.transport is not None
                self.transport.close()
                break
        del buf[:pos]

    # Sending -----------------------------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload))

    def send_text(self, text: str | bytes) -> None:
        self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send_frame(OP_CLOSE, code.to_bytes(2, "big"))
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()


async def connect(
    host: str,
    port: int,
    path: str,
    on_text: Callable[[bytes, float], None],
    *,
    headers: dict[str, str] | None = None,
    recv_buffer: int = 0,
) -> WSClientProtocol:
    """Open a TCP connection and complete the WebSocket handshake.

    ``recv_buffer`` sets ``SO_RCVBUF`` before connecting (0 keeps the kernel's autotuning);
    a small one makes a client that stops reading push back on the server sooner.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if recv_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    try:
        await loop.sock_connect(sock, (host, port))
        _, protocol = await loop.create_connection(lambda: WSClientProtocol(request, on_text), sock=sock)
    except BaseException:
        sock.close()
        raise
    await protocol.upgraded
    return protocol
