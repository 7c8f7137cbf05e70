"""``openai``: any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp, LiteLLM, TGI,
``transformers serve``), streamed with server-sent events over one shared HTTP client.

The client is aiohttp: its C HTTP parser decodes the chunked body in bulk, so one read
yields every event that has arrived, however many chunks carried them, and the per-token
cost falls as load rises. (A pure-Python HTTP/1.1 parser costs one parse step per chunk,
and upstreams send one chunk per token: ten times the CPU per token, measured in
``benchmarks/``.)

Guarantees, in the terms of the backend interface:

- A token is never sent twice: retries (connection failures and 502/503/504 only, bounded,
  with jittered backoff) happen only before the first token, and all of them fit in
  ``GATEWAY_UPSTREAM_FIRST_TOKEN_TIMEOUT_S``, counted from the request.
- When the gateway stops iterating (cancel, closed socket, stale close, ``max_tokens``) the
  upstream response is closed at once, so the model server sees the disconnect and stops
  generating; that is how vLLM and TGI abort a request.
- Upstream faults become ``GatewayError``\\ s whose message is short and sanitised: the API key
  and the extra header values never reach a client, even when an upstream echoes them.
- A stream that ends with neither a ``finish_reason`` nor ``[DONE]`` is a cut connection and
  ends with ``backend_error``; the tokens already delivered stay valid.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar, Literal

import aiohttp
import anyio
import orjson
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from config import Settings
from config.settings import CommaList, split_commas
from gateway.backends.base import (
    CONTINUATION,
    IMAGES,
    PENALTIES,
    REASONING_EFFORT,
    RESPONSE_FORMAT,
    SEED,
    TOOLS,
    BackendSettings,
    Chunk,
    FinishChunk,
    GenerationRequest,
)
from gateway.backends.openai_chat import Usage, message, parse_event, tool_fields
from gateway.backends.sse import SSEDecoder, SSEError
from gateway.backends.upstream import error_text, map_finish_reason, retry_after_seconds, sanitize
from gateway.wire.errors import BackendError, BackendTimeout, BadRequest, GatewayError, RateLimited

logger = logging.getLogger("gateway.backends.openai")

READY_CACHE_S = 5.0
RETRYABLE_STATUS = frozenset({502, 503, 504})
# Longest pause between two attempts, before jitter.
BACKOFF_CAP_S = 5.0
# After a finish_reason, how long to wait for the usage chunk and [DONE].
AFTER_FINISH_GRACE_S = 2.0
# Time given to read an error body and to close a response.
ERROR_BODY_TIMEOUT_S = 2.0
# After [DONE], how long to wait for the end of the body so the connection can be kept
# alive; an upstream that keeps it open longer has its connection closed instead. It delays
# only the `done` frame (every token is out): servers end the body with [DONE] or right
# after it, and a new connection would cost the next request a TCP and TLS handshake.
END_OF_BODY_GRACE_S = 0.1
ERROR_BODY_BYTES = 4096
CHAT_FEATURES = frozenset({TOOLS, IMAGES, RESPONSE_FORMAT, SEED, REASONING_EFFORT, PENALTIES, CONTINUATION})
COMPLETIONS_FEATURES = frozenset({SEED, PENALTIES})

class _Retry(Exception):
    """An attempt failed before the first token in a way worth another attempt; ``error``
    is what the client gets if there is none."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class _WithoutStreamOptions(Exception):
    """The upstream refused ``stream_options``: ask again without it, and count tokens."""


def _header_pairs(value: SecretStr | None) -> list[tuple[str, str, str]]:
    if value is None:
        return []
    pairs = (pair.partition("=") for pair in value.get_secret_value().split(",") if pair.strip())
    return [(name.strip(), sep, rest.strip()) for name, sep, rest in pairs]


class OpenAISettings(BackendSettings):
    """``GATEWAY_OPENAI_*``: the upstream server and how to reach it. The timeouts and
    retries (``GATEWAY_UPSTREAM_*``) are the gateway's, in ``Settings``."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_OPENAI_")

    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    model: str | None = None
    models: CommaList = []
    api: Literal["chat", "completions"] = "chat"
    # name=value pairs, comma-separated; a secret, as a header may carry a credential.
    extra_headers: SecretStr | None = None
    max_connections: int = Field(default=100, ge=1)
    keepalive_s: float = Field(default=15.0, gt=0)
    # The largest event the upstream may send; a larger one ends the stream with backend_error.
    max_event_bytes: int = Field(default=1 << 20, ge=1024)
    # An HTTP proxy for upstream requests (https upstreams tunnel through it with CONNECT);
    # a secret, as its URL may carry credentials. The process environment's HTTP(S)_PROXY
    # and ~/.netrc are not consulted.
    proxy: SecretStr | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return split_commas(value)

    @field_validator("extra_headers")
    @classmethod
    def _valid_header_pairs(cls, value: SecretStr | None) -> SecretStr | None:
        for name, sep, _ in _header_pairs(value):
            # Only the name goes into the message: a header value may be a credential.
            if not sep or not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"openai_extra_headers: expected name=value pairs, got one named {name!r}")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("openai_base_url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("openai_proxy must start with http:// or https://")
        return value

    @property
    def headers(self) -> dict[str, str]:
        """``extra_headers`` as a mapping."""
        return {name: value for name, _, value in _header_pairs(self.extra_headers)}


class OpenAIBackend:
    name = "openai"
    settings_model: ClassVar[type[BackendSettings]] = OpenAISettings

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.openai = openai = settings.backend_settings_as(OpenAISettings)
        # The Chat Completions API takes everything a request can ask for; the legacy
        # completions API only a prompt and its sampling.
        self.features = CHAT_FEATURES if openai.api == "chat" else COMPLETIONS_FEATURES
        self._session: aiohttp.ClientSession | None = None
        self._url = openai.base_url + ("/chat/completions" if openai.api == "chat" else "/completions")
        self._models_url = openai.base_url + "/models"
        # What a client may ask for: the list, or by default only the configured model.
        self._allowed_models: list[str] = list(openai.models) or ([openai.model] if openai.model else [])
        # What GET /v1/models lists.
        self.model_ids = tuple(m for m in self._allowed_models if m != "*") or ((openai.model,) if openai.model else ())
        key = openai.api_key.get_secret_value() if openai.api_key else ""
        self._headers = dict(openai.headers)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._proxy = openai.proxy.get_secret_value() if openai.proxy else None
        # Longest first, so a secret that contains another is removed whole.
        candidates = [key, *openai.headers.values(), self._proxy or ""]
        self._secrets = tuple(sorted({s for s in candidates if len(s) >= 4}, key=len, reverse=True))
        self._include_usage = True
        self._ready_until = -math.inf
        self._ready_value = False
        self._ready_lock: anyio.Lock | None = None

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            connector=aiohttp.TCPConnector(limit=self.openai.max_connections,
                                           keepalive_timeout=self.openai.keepalive_s),
            # Reads are bounded by the first-token and idle deadlines below, and waiting for
            # a pooled connection by the first-token deadline, not by per-read timeouts.
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=s.upstream_connect_timeout_s,
                                          sock_read=None),
            # The proxy comes from settings. Trusting the environment would also read
            # ~/.netrc on every request (in a thread), and a netrc entry for the upstream's
            # host would make aiohttp refuse every request that carries the API key.
            trust_env=False,
            raise_for_status=False,
        )
        self._ready_lock = anyio.Lock()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ready(self) -> bool:
        """``GET /models`` answered 200, cached for ``READY_CACHE_S``."""
        session, lock = self._session, self._ready_lock
        if session is None or lock is None:
            return False
        async with lock:
            if anyio.current_time() < self._ready_until:
                return self._ready_value
            ok = False
            with anyio.move_on_after(self.settings.upstream_connect_timeout_s + 5.0):
                try:
                    async with session.get(self._models_url, proxy=self._proxy) as response:
                        ok = response.status == 200
                        if not ok:
                            logger.warning("upstream readiness check: HTTP %d", response.status)
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    logger.warning("upstream readiness check failed: %s", type(exc).__name__)
            self._ready_value = ok
            self._ready_until = anyio.current_time() + READY_CACHE_S
            return ok

    # Requests -------------------------------------------------------------------------------

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        o = self.openai
        model = request.model
        if model is not None and model not in self._allowed_models and "*" not in self._allowed_models:
            # Upstreams bill by model: a client's choice is honoured only when the operator
            # listed it (GATEWAY_OPENAI_MODELS), or it is the configured model.
            allowed = ", ".join(self._allowed_models) or "none: the server chooses the model"
            raise BadRequest(f"model {model!r} is not available; allowed: {allowed}")
        model = model or o.model or next((m for m in o.models if m != "*"), None)
        body: dict[str, Any] = {"stream": True, "max_tokens": request.max_tokens}
        if model:
            body["model"] = model
        if o.api == "chat":
            turns = request.messages or ()
            body["messages"] = (
                [message(turn) for turn in turns] if turns else [{"role": "user", "content": request.prompt or ""}]
            )
            body.update(tool_fields(request))
            if request.response_format is not None:
                body["response_format"] = request.response_format
            if request.reasoning_effort is not None:
                body["reasoning_effort"] = request.reasoning_effort
            if request.continue_final_message:
                # vLLM's and SGLang's: the last (assistant) message is continued, not answered.
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        else:
            body["prompt"] = (
                request.prompt if request.prompt is not None else "\n\n".join(t.text for t in request.messages)
            )
        for name in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.stop:
            body["stop"] = list(request.stop)
        if self._include_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        session = self._session
        if session is None:
            raise BackendError("the openai backend is not started")
        body = self.request_body(request)
        s = self.settings
        deadline = anyio.current_time() + s.upstream_first_token_timeout_s
        retries = 0
        while True:
            try:
                async with aclosing(self._attempt(session, body, deadline, request.id)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except _WithoutStreamOptions:
                body.pop("stream_options", None)
                continue
            except _Retry as retry:
                delay = min(BACKOFF_CAP_S, s.upstream_retry_backoff_s * 2**retries) * random.uniform(0.5, 1.0)
                retries += 1
                if retries > s.upstream_retries or anyio.current_time() + delay >= deadline:
                    raise retry.error from None
                logger.info("stream=%s upstream attempt failed (%s); retry %d", request.id, retry, retries)
                await anyio.sleep(delay)

    async def _attempt(
        self, session: aiohttp.ClientSession, body: dict[str, Any], deadline: float, stream_id: str
    ) -> AsyncGenerator[Chunk]:
        response: aiohttp.ClientResponse | None = None
        with anyio.CancelScope(deadline=deadline):
            try:
                response = await session.post(self._url, data=orjson.dumps(body), proxy=self._proxy,
                                              headers={"Accept": "text/event-stream",
                                                       "Content-Type": "application/json"})
            except TimeoutError as exc:
                raise _Retry(BackendTimeout(f"the upstream did not answer in time ({type(exc).__name__})")) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise _Retry(BackendError(f"cannot reach the upstream ({_reason(exc)})")) from None
        if response is None:
            raise BackendTimeout(self._first_token_message())
        try:
            if response.status != 200:
                await self._raise_for_status(response, body, stream_id)
            async for chunk in self._events(response, deadline):
                yield chunk
        finally:
            # Closing (not releasing) a response whose body was not read to the end drops
            # its connection: that is how the upstream learns the client went away.
            response.close()

    def _first_token_message(self) -> str:
        return f"no token from the upstream within {self.settings.upstream_first_token_timeout_s:g} s"

    async def _raise_for_status(self, response: aiohttp.ClientResponse, body: dict[str, Any], stream_id: str) -> None:
        status = response.status
        raw = await _read_bounded(response)
        logger.info("stream=%s upstream answered HTTP %d", stream_id, status)
        if status == 400 and "stream_options" in body and "stream_options" in raw:
            self._include_usage = False
            raise _WithoutStreamOptions()
        detail = sanitize(error_text(raw), self._secrets)
        suffix = f": {detail}" if detail else ""
        if status == 429:
            limited = RateLimited(f"the upstream is rate limiting requests{suffix}",
                                  retry_after_s=retry_after_seconds(response.headers))
            limited.extra["upstream_status"] = status
            raise limited
        error = BackendError(f"the upstream answered HTTP {status}{suffix}", upstream_status=status)
        if status in RETRYABLE_STATUS:
            raise _Retry(error)
        raise error

    async def _events(self, response: aiohttp.ClientResponse, deadline: float) -> AsyncIterator[Chunk]:
        idle_s = self.settings.upstream_idle_timeout_s
        content = response.content
        text_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder = SSEDecoder(max_event_chars=self.openai.max_event_bytes)
        usage = Usage()
        calls: dict[int, str | None] = {}
        finish: str | None = None
        done = False
        count = 0
        while not done:
            if finish is not None:
                limit = anyio.current_time() + min(idle_s, AFTER_FINISH_GRACE_S)
            elif count == 0:
                limit = deadline
            else:
                limit = anyio.current_time() + idle_s
            # Every byte that has arrived, all its events at once: under load one read
            # carries many tokens, and they reach the client as one frame.
            data = b""
            with anyio.CancelScope(deadline=limit) as scope:
                try:
                    data = await content.readany()
                except (aiohttp.ClientError, OSError) as exc:
                    if finish is not None:
                        break
                    error = BackendError(f"the upstream connection broke ({_reason(exc)})")
                    if count == 0:
                        raise _Retry(error) from None
                    raise error from None
            if scope.cancelled_caught:
                if finish is not None:
                    break
                if count == 0:
                    raise BackendTimeout(self._first_token_message())
                raise BackendTimeout(f"the upstream sent nothing for {idle_s:g} s")
            if not data:
                break
            try:
                events = decoder.feed(text_decoder.decode(data))
            except SSEError:
                raise BackendError("the upstream sent a malformed event") from None
            for event in events:
                if event.data.strip() == "[DONE]":
                    done = True
                    break
                chunks, reason = parse_event(event.data, usage, calls, self._secrets)
                for chunk in chunks:
                    count += 1
                    yield chunk
                if reason is not None:
                    finish = reason
                    if usage.completion_tokens is not None:
                        done = True
        if finish is None and not done:
            raise BackendError("the upstream stream ended before it finished")
        await _keep_alive_if_ended(response)
        yield FinishChunk(
            map_finish_reason(finish or "stop"),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens if usage.completion_tokens is not None else count,
            reasoning_tokens=usage.reasoning_tokens,
            cached_tokens=usage.cached_tokens,
        )

async def _read_bounded(response: aiohttp.ClientResponse) -> str:
    data = bytearray()
    with anyio.move_on_after(ERROR_BODY_TIMEOUT_S):
        try:
            while len(data) < ERROR_BODY_BYTES:
                piece = await response.content.readany()
                if not piece:
                    break
                data += piece
        except (aiohttp.ClientError, OSError):
            pass
    return bytes(data[:ERROR_BODY_BYTES]).decode("utf-8", "replace")


async def _keep_alive_if_ended(response: aiohttp.ClientResponse) -> None:
    """Return the connection to the pool when the body ends right after the stream did (the
    usual case: ``[DONE]`` and the last chunk arrive together), so the next request skips
    the TCP and TLS handshakes; otherwise the connection is closed with the response."""
    content = response.content
    with anyio.move_on_after(END_OF_BODY_GRACE_S):
        try:
            while not content.at_eof():
                if not await content.readany():
                    break
        except (aiohttp.ClientError, OSError):
            return
    if content.at_eof():
        response.release()


def _reason(exc: BaseException) -> str:
    """The kind of a connection failure, without its text (which may carry a proxy URL)."""
    code = exc.os_error.errno if isinstance(exc, aiohttp.ClientConnectorError) else None
    if code:
        return f"{type(exc).__name__}: {os.strerror(code).lower()}"
    return type(exc).__name__
