"""``GATEWAY_AUTH=jwt`` (the default): JSON Web Tokens, checked with an HMAC secret, a
public key or a JWKS endpoint.

Only the algorithms in ``GATEWAY_JWT_ALGORITHMS`` are accepted; ``exp`` is required;
``nbf``, ``aud`` and ``iss`` are checked (the latter two when configured) with a small
leeway. Error messages name the reason, never the token or a key.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

import anyio.to_thread
import jwt
import jwt.types

from config import Settings
from gateway.auth.base import Principal
from gateway.wire.errors import AuthError

logger = logging.getLogger("gateway.auth")

_HMAC = {"HS256", "HS384", "HS512"}

# Verifications that may wait on the JWKS endpoint at once: a hanging endpoint holds at
# most this many worker threads, and never the ones other work (a backend) needs.
JWKS_THREADS = 16


class JWTAuthenticator:
    name = "jwt"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = True
        self.algorithms = list(settings.jwt_algorithms)
        self.generated_dev_secret = False
        self._jwks_client: jwt.PyJWKClient | None = None
        # When an unknown key id last refetched the key set; the lock makes concurrent
        # handshakes with unknown ids cause one fetch, not one each.
        self._jwks_refreshed_at = -math.inf
        self._jwks_refresh = threading.Lock()
        self._jwks_threads: anyio.CapacityLimiter | None = None
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        if not settings.has_jwt_key:
            if settings.env == "production":
                raise RuntimeError(
                    "GATEWAY_ENV=production needs a JWT key: set GATEWAY_JWT_SECRET, "
                    "GATEWAY_JWT_PUBLIC_KEY or GATEWAY_JWT_JWKS_URL (or GATEWAY_AUTH=none to turn "
                    "authentication off deliberately)"
                )
            secret = secrets.token_urlsafe(32)
            self.generated_dev_secret = True
            self.algorithms = ["HS256"]
        self._secret = secret
        self._public_key = settings.jwt_public_key
        if settings.jwt_jwks_url:
            self._jwks_client = jwt.PyJWKClient(
                settings.jwt_jwks_url, cache_keys=True, lifespan=int(settings.jwt_jwks_cache_s),
                timeout=settings.jwt_jwks_timeout_s,
            )

    def mint(self, sub: str, ttl_s: float = 3600.0, **claims: Any) -> str:
        """A development token signed with the HMAC secret (configured or generated)."""
        if not self._secret:
            raise RuntimeError("minting needs GATEWAY_JWT_SECRET (an HMAC secret)")
        now = int(time.time())
        payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl_s)}
        if self.settings.jwt_audience:
            payload["aud"] = self.settings.jwt_audience
        if self.settings.jwt_issuer:
            payload["iss"] = self.settings.jwt_issuer
        payload.update(claims)
        algorithm = next((a for a in self.algorithms if a in _HMAC), "HS256")
        return jwt.encode(payload, self._secret, algorithm=algorithm)

    def _key_for(self, token: str, header: Mapping[str, Any]) -> Any:
        alg = header.get("alg")
        if alg in _HMAC:
            if not self._secret:
                raise AuthError("bad_algorithm", "token algorithm is not accepted")
            return self._secret
        if self._jwks_client is not None:
            return self._jwks_key(header.get("kid"))
        if self._public_key:
            return self._public_key
        raise AuthError("bad_algorithm", "token algorithm is not accepted")

    def _jwks_key(self, kid: object) -> Any:
        """The key for ``kid`` from the cached JWKS. An unknown kid (a rotated key) refetches
        the set, at most once per ``GATEWAY_JWT_JWKS_MIN_REFETCH_S``, so tokens with made-up
        kids cannot make the gateway hammer the identity provider."""
        assert self._jwks_client is not None

        def find(keys: list[jwt.PyJWK]) -> Any:
            return next((k.key for k in keys if k.key_id == kid), None)

        try:
            key = find(self._jwks_client.get_signing_keys())
            if key is None:
                with self._jwks_refresh:
                    # Another handshake may have refetched while this one waited.
                    key = find(self._jwks_client.get_signing_keys())
                    now = time.monotonic()
                    if key is None and now - self._jwks_refreshed_at >= self.settings.jwt_jwks_min_refetch_s:
                        self._jwks_refreshed_at = now
                        key = find(self._jwks_client.get_signing_keys(refresh=True))
        except jwt.PyJWKClientConnectionError:
            raise AuthError("jwks_unavailable", "signing keys are unavailable") from None
        except jwt.PyJWKClientError:
            raise AuthError("unknown_key", "token signing key is unknown") from None
        if key is None:
            raise AuthError("unknown_key", "token signing key is unknown")
        return key

    def _verify_sync(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "token is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError("bad_algorithm", "token algorithm is not accepted")
        key = self._key_for(token, header)
        options: jwt.types.Options = {"require": ["exp", "sub"], "verify_aud": bool(self.settings.jwt_audience)}
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                leeway=self.settings.jwt_leeway_s,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "token is not yet valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("missing_claim", f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError("bad_audience", "token audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("bad_issuer", "token issuer is not accepted") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "token signature is invalid") from None
        except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError):
            raise AuthError("bad_algorithm", "token algorithm is not accepted") from None
        except jwt.PyJWTError:
            raise AuthError("invalid", "token is invalid") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("missing_claim", "token lacks a valid 'sub' claim")
        exp = claims.get("exp")
        return Principal(user=sub, expires_at=float(exp) if isinstance(exp, int | float) else None, claims=claims)

    async def verify(self, token: str) -> Principal:
        if self._jwks_client is not None:
            # PyJWKClient fetches with blocking I/O: keep it off the event loop.
            if self._jwks_threads is None:
                self._jwks_threads = anyio.CapacityLimiter(JWKS_THREADS)
            return await anyio.to_thread.run_sync(self._verify_sync, token, limiter=self._jwks_threads)
        return self._verify_sync(token)
