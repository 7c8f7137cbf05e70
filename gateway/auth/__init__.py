"""Authentication modes, chosen by ``GATEWAY_AUTH``: ``jwt`` (the default) or ``none``.
Each is one module implementing ``gateway.auth.base.Authenticator``."""

from __future__ import annotations

from config import Settings
from gateway.auth.base import Authenticator, HandshakeCredentials, Principal, extract_credentials, origin_allowed
from gateway.auth.jwt import JWTAuthenticator
from gateway.auth.none import NoAuthenticator

MODES: dict[str, type[JWTAuthenticator] | type[NoAuthenticator]] = {
    "jwt": JWTAuthenticator,
    "none": NoAuthenticator,
}


def build_authenticator(settings: Settings) -> Authenticator:
    return MODES[settings.auth](settings)


__all__ = [
    "MODES",
    "Authenticator",
    "HandshakeCredentials",
    "JWTAuthenticator",
    "NoAuthenticator",
    "Principal",
    "build_authenticator",
    "extract_credentials",
    "origin_allowed",
]
