"""``GATEWAY_AUTH=none``: authentication off; every client is ``anonymous``. For local
development and for a gateway behind a proxy that authenticates."""

from __future__ import annotations

from typing import Any

from config import Settings
from gateway.auth.base import Principal


class NoAuthenticator:
    name = "none"
    enabled = False
    generated_dev_secret = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def verify(self, token: str) -> Principal:
        return Principal(user="anonymous", expires_at=None)

    def mint(self, sub: str, ttl_s: float = 3600.0, **claims: Any) -> str:
        raise RuntimeError("GATEWAY_AUTH=none: there are no tokens to mint")
