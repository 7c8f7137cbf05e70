"""The gateway's settings: the only code that reads the environment.

Every field is read from ``GATEWAY_<NAME>`` (or a ``.env`` file). List settings are
comma-separated in the environment (``GATEWAY_ALLOWED_ORIGINS=https://a.example,https://b.example``).
Everything else in the project receives a ``Settings`` object; tests build one directly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _header_pairs(value: SecretStr | None) -> list[tuple[str, str, str]]:
    if value is None:
        return []
    pairs = (pair.partition("=") for pair in value.get_secret_value().split(",") if pair.strip())
    return [(name.strip(), sep, rest.strip()) for name, sep, rest in pairs]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # An empty value (GATEWAY_JWT_SECRET= in a copied .env.example) means "use the default".
        env_ignore_empty=True,
        # Validation errors are logged at start: they must not show a value, which may be a secret.
        hide_input_in_errors=True,
        # Fields with an alias (cluster_url) can be passed by their name too.
        populate_by_name=True,
    )

    # Server
    env: Literal["dev", "production"] = "dev"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False

    # Authentication
    auth: Literal["jwt", "none"] = "jwt"
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwt_jwks_url: str | None = None
    jwt_jwks_cache_s: float = Field(default=300.0, gt=0)
    jwt_algorithms: CommaList = ["HS256"]
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = Field(default=10.0, ge=0)
    auth_timeout_s: float = Field(default=5.0, gt=0)
    allowed_origins: CommaList = []

    # Backends
    backend: str = "echo"
    echo_delay_ms: float = Field(default=30.0, ge=0)
    synthetic_ttft_ms: float = Field(default=200.0, ge=0)
    synthetic_tokens_per_s: float = Field(default=50.0, ge=0)
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens: int = Field(default=4096, ge=1)

    # openai backend: any OpenAI-compatible server
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr | None = None
    openai_model: str | None = None
    openai_models: CommaList = []
    openai_api: Literal["chat", "completions"] = "chat"
    # name=value pairs, comma-separated; a secret, as a header may carry a credential.
    openai_extra_headers: SecretStr | None = None
    openai_max_connections: int = Field(default=100, ge=1)
    openai_keepalive_s: float = Field(default=15.0, gt=0)
    # An HTTP proxy for upstream requests (https upstreams tunnel through it with CONNECT);
    # a secret, as its URL may carry credentials. The process environment's HTTP(S)_PROXY
    # and ~/.netrc are not consulted.
    openai_proxy: SecretStr | None = None
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_first_token_timeout_s: float = Field(default=60.0, gt=0)
    upstream_idle_timeout_s: float = Field(default=30.0, gt=0)
    upstream_retries: int = Field(default=2, ge=0)
    upstream_retry_backoff_s: float = Field(default=0.25, ge=0)

    # transformers backend: a local Hugging Face model
    local_model: str | None = None
    local_device: str = "auto"
    local_max_concurrency: int = Field(default=1, ge=1)
    local_queue_size: int = Field(default=16, ge=0)

    # Limits
    max_message_bytes: int = Field(default=65536, ge=256)
    max_prompt_chars: int = Field(default=32000, ge=1)
    max_streams_per_connection: int = Field(default=8, ge=1)
    max_streams_per_user: int = Field(default=32, ge=1)
    max_connections: int = Field(default=10000, ge=1)
    max_connections_per_user: int = Field(default=32, ge=1)
    user_generate_rate_per_s: float = Field(default=5.0, gt=0)
    user_generate_burst: int = Field(default=20, ge=1)

    # Backpressure and socket writes
    send_queue_size: int = Field(default=256, ge=1)
    slow_consumer_timeout_s: float = Field(default=10.0, gt=0)
    socket_send_buffer_bytes: int = Field(default=262144, ge=0)
    tcp_user_timeout_s: float = Field(default=30.0, ge=0)

    # Heartbeats
    ws_ping_interval_s: float = Field(default=20.0, ge=0)
    ws_ping_timeout_s: float = Field(default=20.0, ge=0)
    heartbeat_interval_s: float = Field(default=15.0, gt=0)
    heartbeat_timeout_s: float = Field(default=45.0, gt=0)

    # Shutdown
    drain_timeout_s: float = Field(default=20.0, ge=0)

    # Scale-out and resume
    # memory:// (one process) or redis:// / rediss:// (any number of processes share
    # streams, limits and control messages). GATEWAY_REDIS_URL is accepted as its old name.
    cluster_url: str = Field(default="memory://",
                             validation_alias=AliasChoices("GATEWAY_CLUSTER_URL", "GATEWAY_REDIS_URL", "redis_url"))
    redis_prefix: str = "gw:"
    redis_max_connections: int = Field(default=64, ge=2)
    resume_ttl_s: float = Field(default=300.0, gt=0)
    resume_grace_s: float = Field(default=30.0, ge=0)
    node_ttl_s: float = Field(default=10.0, gt=0)
    workers: int = Field(default=1, ge=1)

    # Roles and rooms
    roles_claim: str = "roles"
    admin_role: str = "admin"
    rooms_claim: str = "rooms"
    max_rooms_per_connection: int = Field(default=16, ge=1)

    @field_validator("jwt_algorithms", "allowed_origins", "openai_models", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        allowed = {
            "HS256",
            "HS384",
            "HS512",
            "RS256",
            "RS384",
            "RS512",
            "ES256",
            "ES384",
            "ES512",
            "PS256",
            "PS384",
            "PS512",
            "EdDSA",
        }
        unknown = [alg for alg in value if alg not in allowed]
        if unknown:
            raise ValueError(f"unsupported JWT algorithm(s): {', '.join(unknown)}")
        if not value:
            raise ValueError("at least one JWT algorithm is required")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # RFC 7518 3.2: an HS256 key must be at least as long as the hash (32 bytes).
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes long")
        return value

    @field_validator("openai_extra_headers")
    @classmethod
    def _header_pairs(cls, value: SecretStr | None) -> SecretStr | None:
        for name, sep, _ in _header_pairs(value):
            # Only the name goes into the message: a header value may be a credential.
            if not sep or not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"openai_extra_headers: expected name=value pairs, got one named {name!r}")
        return value

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("openai_base_url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("openai_proxy")
    @classmethod
    def _proxy_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("openai_proxy must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be longer than heartbeat_interval_s")
        return self

    @property
    def openai_headers(self) -> dict[str, str]:
        """``openai_extra_headers`` as a mapping."""
        return {name: value for name, _, value in _header_pairs(self.openai_extra_headers)}

    @property
    def has_jwt_key(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwt_jwks_url)
