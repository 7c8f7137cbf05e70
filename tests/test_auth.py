"""Authentication: JWT checks, the four ways to present a token, origins, and modes."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from config import Settings
from gateway.auth import JWTAuthenticator, extract_credentials, origin_allowed
from gateway.backends.synthetic import synthetic_tokens
from gateway.wire.errors import AuthError
from tests.support import (
    SECRET,
    Serve,
    connected,
    make_settings,
    mint,
    recv_json,
    recv_until,
    stream_text,
    terminal_for,
    ws_connect,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


OTHER_SECRET = "another-secret-0123456789abcdef-long-enough"


def bad_tokens(key: rsa.RSAPrivateKey) -> dict[str, tuple[str, str]]:
    """name -> (token, expected rejection reason), for a server with HS256, audience and issuer."""
    now = int(time.time())
    good = {"sub": "alice", "exp": now + 600, "aud": "gw", "iss": "issuer"}
    unsigned = _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(json.dumps(good).encode()) + "."
    return {
        "bad signature": (jwt.encode(good, OTHER_SECRET, algorithm="HS256"), "bad_signature"),
        "expired": (jwt.encode({**good, "exp": now - 60}, SECRET, algorithm="HS256"), "expired"),
        "missing exp": (jwt.encode({k: v for k, v in good.items() if k != "exp"}, SECRET, algorithm="HS256"),
                        "missing_claim"),
        "not yet valid": (jwt.encode({**good, "nbf": now + 600}, SECRET, algorithm="HS256"), "not_yet_valid"),
        "wrong audience": (jwt.encode({**good, "aud": "other"}, SECRET, algorithm="HS256"), "bad_audience"),
        "wrong issuer": (jwt.encode({**good, "iss": "mallory"}, SECRET, algorithm="HS256"), "bad_issuer"),
        "alg none": (unsigned, "bad_algorithm"),
        "RS256 token on an HS256 server": (jwt.encode(good, key, algorithm="RS256"), "bad_algorithm"),
        "garbage": ("not.a.jwt", "malformed"),
    }


def strict_settings(**overrides: Any) -> Settings:
    return make_settings(jwt_audience="gw", jwt_issuer="issuer", jwt_leeway_s=5, **overrides)


def good_token(**claims: Any) -> str:
    return mint("alice", aud="gw", iss="issuer", **claims)


async def test_each_bad_token_is_rejected_with_its_reason(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = JWTAuthenticator(strict_settings())
    for name, (token, reason) in bad_tokens(rsa_key).items():
        with pytest.raises(AuthError) as info:
            await auth.verify(token)
        assert info.value.reason == reason, name
        assert token not in info.value.message and SECRET not in info.value.message
    principal = await auth.verify(good_token())
    assert principal.user == "alice" and principal.expires_at is not None


async def test_hs256_token_signed_with_the_rs256_public_key_is_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic key-confusion attack against a server that accepts RS256."""
    pem = public_pem(rsa_key)
    auth = JWTAuthenticator(make_settings(jwt_secret=None, jwt_public_key=pem, jwt_algorithms=["RS256"]))
    payload = {"sub": "mallory", "exp": int(time.time()) + 600}
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64(json.dumps(payload).encode())
    import hashlib
    import hmac

    signature = _b64(hmac.new(pem.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(AuthError) as info:
        await auth.verify(f"{header}.{body}.{signature}")
    assert info.value.reason == "bad_algorithm"
    assert (await auth.verify(jwt.encode(payload, rsa_key, algorithm="RS256"))).user == "mallory"


async def test_leeway_accepts_a_token_that_just_expired() -> None:
    auth = JWTAuthenticator(make_settings(jwt_leeway_s=30))
    assert (await auth.verify(mint(ttl=-10))).user == "alice"


async def test_handshake_rejections_are_http_403_without_upgrade(rsa_key: rsa.RSAPrivateKey, serve: Serve) -> None:
    server = serve(strict_settings())
    for name, (token, reason) in bad_tokens(rsa_key).items():
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(server.url, token):
                pass
        assert info.value.response.status_code == 403, name
        body = json.loads(info.value.response.body or b"{}")
        assert body["error"] == "unauthorized" and token not in json.dumps(body)
        assert server.metric(f'gateway_auth_failures_total{{reason="{reason}"}}') >= 1, name
    assert server.metric('gateway_auth_failures_total{reason="expired"}') == 1
    async with connected(server, good_token()) as ws:
        assert ws.hello["user"] == "alice"


async def test_subprotocol_auth_selects_gateway_v1_and_never_echoes_the_token(serve: Serve) -> None:
    token = mint("bella")
    async with connected(serve(), subprotocols=["gateway.v1", f"bearer.{token}"]) as ws:
        assert ws.subprotocol == "gateway.v1"
        assert ws.response is not None
        assert token not in str(ws.response.headers)
        assert ws.hello["user"] == "bella"


async def test_query_parameter_auth(serve: Serve) -> None:
    async with ws_connect(f"{serve().url}?token={mint('quinn')}") as ws:
        assert (await recv_json(ws))["user"] == "quinn"


async def test_first_message_auth(serve: Serve) -> None:
    async with ws_connect(serve().url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": mint("fiona")}))
        assert (await recv_json(ws))["user"] == "fiona"


@pytest.mark.parametrize("first", [
    json.dumps({"type": "auth", "token": "garbage"}),
    json.dumps({"type": "generate", "prompt": "hi"}),
    "hello",
])
async def test_a_rejected_first_message_closes_1008(first: str, serve: Serve) -> None:
    async with ws_connect(serve().url) as ws:
        await ws.send(first)
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert "garbage" not in info.value.rcvd.reason


async def test_no_credentials_and_no_auth_message_times_out_with_1008(serve: Serve) -> None:
    async with ws_connect(serve(auth_timeout_s=0.3).url) as ws:
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws, timeout=3)
        assert time.monotonic() - started < 2
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert info.value.rcvd.reason == "authentication timeout"


async def test_origin_allowlist(serve: Serve) -> None:
    server = serve(allowed_origins=["https://app.example"])
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server.url, mint(), origin="https://evil.example"):
            pass
    assert info.value.response.status_code == 403
    async with connected(server, mint(), origin="https://app.example") as ws:
        assert ws.hello["type"] == "hello"
    async with connected(server, mint()) as ws:  # no Origin header: not a browser
        assert ws.hello["type"] == "hello"


def test_origin_allowed_rules() -> None:
    assert origin_allowed(None, ["https://a"])
    assert origin_allowed("https://x", [])
    assert origin_allowed("https://a", ["https://a/"])
    assert not origin_allowed("https://b", ["https://a"])
    assert origin_allowed("https://b", ["*"])


def test_credential_precedence_and_subprotocol_selection() -> None:
    creds = extract_credentials({"authorization": "Bearer H"}, ["gateway.v1", "bearer.S"], b"token=Q")
    assert (creds.token, creds.source, creds.subprotocol) == ("H", "header", "gateway.v1")
    creds = extract_credentials({}, ["bearer.S", "gateway.v1"], b"token=Q")
    assert (creds.token, creds.source, creds.subprotocol) == ("S", "subprotocol", "gateway.v1")
    creds = extract_credentials({}, [], b"a=1&token=Q")
    assert (creds.token, creds.source, creds.subprotocol) == ("Q", "query", None)
    assert extract_credentials({}, ["bearer.S"], b"").subprotocol is None


async def test_auth_none_serves_anonymous(serve: Serve) -> None:
    async with connected(serve(auth="none", jwt_secret=None)) as ws:
        assert ws.hello["user"] == "anonymous"


def test_production_without_a_key_refuses_to_start() -> None:
    with pytest.raises(RuntimeError, match="GATEWAY_JWT_SECRET"):
        JWTAuthenticator(make_settings(env="production", jwt_secret=None))


async def test_dev_without_a_key_generates_a_secret_and_mints() -> None:
    auth = JWTAuthenticator(make_settings(jwt_secret=None))
    assert auth.generated_dev_secret
    assert (await auth.verify(auth.mint("dev"))).user == "dev"
    other = JWTAuthenticator(make_settings(jwt_secret=None))
    with pytest.raises(AuthError):
        await other.verify(auth.mint("dev"))


class IdentityProvider:
    """A JWKS endpoint the test controls: which keys it publishes, and whether it hangs."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.fetches = 0
        self.hang = threading.Event()
        self.released = threading.Event()
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.fetches += 1
                if provider.hang.is_set():
                    provider.released.wait(30)
                    return
                jwks = []
                for kid, key in provider.keys.items():
                    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
                    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
                    jwks.append(jwk)
                body = json.dumps({"keys": jwks}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def rotate_in(self, kid: str) -> rsa.RSAPrivateKey:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.keys[kid]

    def token(self, kid: str, sub: str = "kim", key: rsa.RSAPrivateKey | None = None) -> str:
        payload = {"sub": sub, "exp": int(time.time()) + 600}
        return jwt.encode(payload, key or self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def provider() -> Iterator[IdentityProvider]:
    idp = IdentityProvider()
    thread = threading.Thread(target=idp.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield idp
    finally:
        idp.released.set()
        idp.httpd.shutdown()
        idp.httpd.server_close()


async def test_a_rotated_key_is_accepted_without_a_restart(provider: IdentityProvider, serve: Serve) -> None:
    provider.rotate_in("k1")
    server = serve(jwt_secret=None, jwt_jwks_url=provider.url, jwt_algorithms=["RS256"])
    async with connected(server, provider.token("k1", "old")) as ws:
        assert ws.hello["user"] == "old"
    provider.rotate_in("k2")  # the identity provider rotates; the gateway's cache has only k1
    users: list[str] = []

    async def arrive(index: int) -> None:
        async with connected(server, provider.token("k2", f"new-{index}")) as ws:
            users.append(ws.hello["user"])

    # Many clients with the new key at once: one refetch, and every one of them gets in.
    fetches = provider.fetches
    async with anyio.create_task_group() as tg:
        for index in range(20):
            tg.start_soon(arrive, index)
    assert sorted(users) == sorted(f"new-{index}" for index in range(20))
    assert provider.fetches - fetches == 1


async def test_random_key_ids_cause_at_most_one_fetch(provider: IdentityProvider, serve: Serve) -> None:
    provider.rotate_in("k1")
    server = serve(jwt_secret=None, jwt_jwks_url=provider.url, jwt_algorithms=["RS256"],
                   jwt_jwks_min_refetch_s=60)
    async with connected(server, provider.token("k1")):
        pass
    fetches = provider.fetches
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = 0

    async def attempt(index: int) -> None:
        nonlocal refused
        try:
            async with ws_connect(server.url, provider.token(f"random-{index}", key=stranger)):
                pass
        except InvalidStatus as exc:
            assert exc.response.status_code == 403
            refused += 1

    async with anyio.create_task_group() as tg:
        for index in range(100):
            tg.start_soon(attempt, index)
    assert refused == 100
    assert provider.fetches - fetches <= 1


@pytest.mark.slow
async def test_a_hanging_jwks_endpoint_fails_only_the_handshakes_that_need_it(
        provider: IdentityProvider, serve: Serve) -> None:
    provider.rotate_in("k1")
    server = serve(jwt_secret=None, jwt_jwks_url=provider.url, jwt_algorithms=["RS256"], jwt_jwks_timeout_s=1,
                   jwt_jwks_min_refetch_s=0, backend="synthetic", synthetic_tokens_per_s=50, synthetic_ttft_ms=0)
    async with connected(server, provider.token("k1", "streamer")) as streaming:
        await streaming.send(json.dumps({"type": "generate", "id": "on", "prompt": "p", "max_tokens": 100}))
        provider.hang.set()
        started = anyio.current_time()
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(server.url, provider.token("k9", key=provider.rotate_in("k9"))):
                pass
        waited = anyio.current_time() - started
        assert refused.value.response.status_code == 403
        assert waited < 1 + 3  # the fetch's timeout, and some slack for a busy machine
        # A token whose key is cached still gets in while the endpoint hangs.
        async with connected(server, provider.token("k1", "late")) as late:
            assert late.hello["user"] == "late"
        frames = await recv_until(streaming, terminal_for("on"), timeout=10)
    assert stream_text(frames, "on") == "".join(synthetic_tokens("p", 100))
    assert server.metric('gateway_auth_failures_total{reason="jwks_unavailable"}') == 1


async def test_jwks_keys(rsa_key: rsa.RSAPrivateKey, provider: IdentityProvider, serve: Serve) -> None:
    provider.keys["k1"] = rsa_key
    server = serve(jwt_secret=None, jwt_jwks_url=provider.url, jwt_algorithms=["RS256"])
    payload = {"sub": "jay", "exp": int(time.time()) + 600}
    async with connected(server, jwt.encode(payload, rsa_key, algorithm="RS256", headers={"kid": "k1"})) as ws:
        assert ws.hello["user"] == "jay"
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server.url, jwt.encode(payload, other_key, algorithm="RS256",
                                                     headers={"kid": "unknown"})):
            pass
    assert info.value.response.status_code == 403
    assert server.metric('gateway_auth_failures_total{reason="unknown_key"}') == 1
    # Made-up key ids do not make the gateway refetch the key set each time.
    hits = provider.fetches
    for attempt in range(5):
        with pytest.raises(InvalidStatus):
            async with ws_connect(server.url, jwt.encode(payload, other_key, algorithm="RS256",
                                                         headers={"kid": f"made-up-{attempt}"})):
                pass
    assert provider.fetches == hits
