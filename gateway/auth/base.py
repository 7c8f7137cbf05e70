"""Authentication's interface: who a client is (``Principal``), where a handshake carries
its token (``extract_credentials``), which browser origins may connect, and the
``Authenticator`` every mode implements (``jwt.py``, ``none.py``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

from gateway.wire import BEARER_SUBPROTOCOL_PREFIX, PROTOCOL


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    expires_at: float | None  # wall-clock seconds since the epoch
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HandshakeCredentials:
    token: str | None
    source: str | None  # "header", "subprotocol" or "query"
    subprotocol: str | None  # the subprotocol the server selects, never a bearer token


def extract_credentials(
    headers: Mapping[str, str], subprotocols: Iterable[str], query_string: bytes
) -> HandshakeCredentials:
    """Find a token in the handshake: Authorization header, then subprotocol, then query."""
    offered = list(subprotocols)
    selected = PROTOCOL if PROTOCOL in offered else None
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return HandshakeCredentials(value.strip(), "header", selected)
    for proto in offered:
        if proto.startswith(BEARER_SUBPROTOCOL_PREFIX) and len(proto) > len(BEARER_SUBPROTOCOL_PREFIX):
            return HandshakeCredentials(proto[len(BEARER_SUBPROTOCOL_PREFIX) :], "subprotocol", selected)
    for key, val in parse_qsl(query_string.decode("latin-1"), keep_blank_values=False):
        if key == "token" and val:
            return HandshakeCredentials(val, "query", selected)
    return HandshakeCredentials(None, None, selected)


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    """No allowlist, or no Origin header (not a browser): allowed. Otherwise it must be listed."""
    if not allowed or origin is None:
        return True
    return "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}


class Authenticator(Protocol):
    name: str
    # False when every client is let in as "anonymous" (GATEWAY_AUTH=none).
    enabled: bool
    # True when no key was configured and a random development secret was made for the run.
    generated_dev_secret: bool

    async def verify(self, token: str) -> Principal:
        """The principal a credential proves, or raise ``AuthError`` (its message names the
        reason, never the token or a key)."""

    def mint(self, sub: str, ttl_s: float = 3600.0, **claims: Any) -> str:
        """A development token this authenticator accepts; raises ``RuntimeError`` when it
        cannot make one."""
