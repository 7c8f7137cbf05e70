"""The gateway's settings: the only code that reads the environment.

Every field is read from ``GATEWAY_<NAME>`` (or a ``.env`` file). List settings are
comma-separated in the environment (``GATEWAY_ALLOWED_ORIGINS=https://a.example,https://b.example``).
The chosen backend's own settings are its model (``config.backends``), read from its
``GATEWAY_<BACKEND>_*`` variables into ``backend_settings``.
Everything else in the project receives a ``Settings`` object; tests build one directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    AliasChoices,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, from_json
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from config.backends import BackendLoadError, BackendSettings, load_backend_settings, validation_error
from config.routes import RoutesConfig, read_routes_file

CommaList = Annotated[list[str], NoDecode]

_Model = TypeVar("_Model", bound=BackendSettings)

# The source options (``_env_file=None``…) of the ``Settings(...)`` call being validated:
# the backend's model is read with them too.
_SOURCE_OPTIONS: ContextVar[Mapping[str, Any] | None] = ContextVar("settings_source_options", default=None)


def split_commas(value: Any) -> Any:
    """A comma-separated string as a list of its stripped, non-empty items; others unchanged."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


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
    jwt_jwks_min_refetch_s: float = Field(default=30.0, ge=0)
    jwt_jwks_timeout_s: float = Field(default=5.0, gt=0)
    jwt_algorithms: CommaList = ["HS256"]
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = Field(default=10.0, ge=0)
    auth_timeout_s: float = Field(default=5.0, gt=0)
    allowed_origins: CommaList = []

    # Backends
    backend: str = "echo"
    # The chosen backend's own settings model, filled in by _with_backend_settings from its
    # GATEWAY_<BACKEND>_* variables; None for a backend that declares none.
    backend_settings: Annotated[SerializeAsAny[BackendSettings] | None, NoDecode] = None
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens: int = Field(default=4096, ge=1)

    # Requests to an upstream model server (the openai backend's today)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_first_token_timeout_s: float = Field(default=60.0, gt=0)
    upstream_idle_timeout_s: float = Field(default=30.0, gt=0)
    upstream_retries: int = Field(default=2, ge=0)
    upstream_retry_backoff_s: float = Field(default=0.25, ge=0)

    # Routes: several deployments behind one model name (config/routes.py, docs/routing.md).
    # GATEWAY_ROUTES is inline JSON; GATEWAY_ROUTES_FILE a JSON or TOML file. Without
    # either, GATEWAY_BACKEND serves every request, as one implicit route.
    routes: RoutesConfig | None = None
    routes_file: str | None = None
    # How long a request waits for a slot when every deployment is at its max_concurrency.
    route_queue_timeout_s: float = Field(default=10.0, ge=0)

    # Limits
    max_message_bytes: int = Field(default=1 << 20, ge=256)
    max_prompt_chars: int = Field(default=32000, ge=1)
    max_streams_per_connection: int = Field(default=8, ge=1)
    max_streams_per_user: int = Field(default=32, ge=1)
    max_connections: int = Field(default=10000, ge=1)
    max_pending_auth: int = Field(default=1000, ge=1)
    max_connections_per_user: int = Field(default=32, ge=1)
    user_generate_rate_per_s: float = Field(default=5.0, gt=0)
    user_generate_burst: int = Field(default=20, ge=1)
    # Every inbound frame of one connection (generate, cancel, resume, join, leave, ping…).
    connection_frame_rate_per_s: float = Field(default=50.0, gt=0)
    connection_frame_burst: int = Field(default=100, ge=1)
    flood_close_s: float = Field(default=10.0, gt=0)

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

    # Garbage collection: a full collection stops every connection at once for as long as
    # it scans the live objects (tens of milliseconds with a thousand connections).
    gc_freeze_after_start: bool = True
    gc_full_collection_interval_s: float = Field(default=60.0, ge=0)
    # After each scheduled full collection, hand freed heap memory back to the system.
    gc_trim_after_collection: bool = True

    # Scale-out and resume
    # memory:// (one process) or redis:// / rediss:// (any number of processes share
    # streams, limits and control messages). GATEWAY_REDIS_URL is accepted as its old name.
    cluster_url: str = Field(default="memory://",
                             validation_alias=AliasChoices("GATEWAY_CLUSTER_URL", "GATEWAY_REDIS_URL", "redis_url"))
    # A Redis Cluster behind GATEWAY_CLUSTER_URL (any one of its nodes): keys are hash-tagged
    # so every script and transaction stays in one slot, and pub/sub is sharded.
    redis_cluster: bool = False
    redis_prefix: str = "gw:"
    redis_max_connections: int = Field(default=64, ge=2)
    redis_pool_timeout_s: float = Field(default=10.0, gt=0)
    resume_ttl_s: float = Field(default=300.0, gt=0)
    # Redis store: one pipeline per process per flush interval carries every generation's
    # new tokens. A generation followed on another process (or in a room) writes at that
    # pace; one nobody follows elsewhere writes a checkpoint at the slower pace, and writes
    # at once when a follower elsewhere announces itself.
    store_flush_interval_s: float = Field(default=0.05, gt=0, le=5)
    store_checkpoint_interval_s: float = Field(default=1.0, gt=0, le=60)
    store_max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    resume_grace_s: float = Field(default=30.0, ge=0)
    # A dropped HTTP stream (the OpenAI-compatible API); unset: resume_grace_s.
    http_resume_grace_s: float | None = Field(default=None, ge=0)
    node_ttl_s: float = Field(default=10.0, gt=0)
    workers: int = Field(default=1, ge=1)

    # Roles and rooms
    roles_claim: str = "roles"
    admin_role: str = "admin"
    rooms_claim: str = "rooms"
    max_rooms_per_connection: int = Field(default=16, ge=1)

    # Hidden from type checkers, which then go on checking keywords against the fields.
    if not TYPE_CHECKING:

        def __init__(self, **values: Any) -> None:
            options = {key: value for key, value in values.items()
                       if key.startswith("_") and not key.startswith("_env_prefix")}
            token = _SOURCE_OPTIONS.set(options)
            try:
                super().__init__(**values)
            finally:
                _SOURCE_OPTIONS.reset(token)

    @model_validator(mode="wrap")
    @classmethod
    def _with_backend_settings(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """Fills ``backend_settings`` with the chosen backend's model (see
        ``config.backends.load_backend_settings``), reporting its errors beside the others'.

        A name that loads nothing leaves it None: ``load_backend`` reports that when the
        backend is needed, so ``gateway token`` and ``gateway chat`` work whatever it is.
        """
        if not isinstance(data, dict):
            return handler(data)
        data = _with_routes_from_file(data)
        name = data.get("backend", cls.model_fields["backend"].default)
        backend_error: ValidationError | None = None
        if isinstance(name, str):
            try:
                built = load_backend_settings(name, data.get("backend_settings"), _SOURCE_OPTIONS.get())
            except BackendLoadError:
                built = None
            except ValidationError as exc:
                backend_error, built = exc, None
            data = {**data, "backend_settings": built}
        try:
            settings = handler(data)
        except ValidationError as exc:
            if backend_error is None:
                raise
            errors = [*exc.errors(), *backend_error.errors()]
            raise validation_error(cls.__name__, [(error, error["loc"]) for error in errors]) from None
        if backend_error is not None:
            raise backend_error
        return settings

    @field_validator("routes", mode="before")
    @classmethod
    def _routes_json(cls, value: Any) -> Any:
        # GATEWAY_ROUTES arrives decoded; a string is the inline JSON given as a keyword.
        if isinstance(value, str):
            return read_routes_json(value)
        return value

    @field_validator("jwt_algorithms", "allowed_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return split_commas(value)

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

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be longer than heartbeat_interval_s")
        return self

    def backend_settings_as(self, model: type[_Model]) -> _Model:
        """The backend's own settings, typed as ``model``, the model the backend declares.

        Raises ``TypeError`` when they are not (settings made for another backend)."""
        found = self.backend_settings
        if not isinstance(found, model):
            carried = "no backend settings" if found is None else f"{type(found).__name__}"
            raise TypeError(f"this backend reads {model.__name__}, but the settings (GATEWAY_BACKEND="
                            f"{self.backend}) carry {carried}")
        return found

    @property
    def has_jwt_key(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwt_jwks_url)


def read_routes_json(text: str) -> Any:
    try:
        return from_json(text)
    except ValueError as exc:
        raise PydanticCustomError("routes_json", "GATEWAY_ROUTES is not valid JSON: {reason}",
                                  {"reason": str(exc)}) from None


def _with_routes_from_file(data: dict[str, Any]) -> dict[str, Any]:
    """``routes`` read from ``routes_file``, validated there so that an error is located in
    the file (``routes_file.routes.chat.deployments.0.base_url``)."""
    path = data.get("routes_file")
    if not path:
        return data
    if data.get("routes") is not None:
        raise validation_error("Settings", [({"type": "routes_file", "input": None,  # type: ignore[typeddict-item]
                                              "msg": "set GATEWAY_ROUTES or GATEWAY_ROUTES_FILE, not both"},
                                             ("routes_file",))])
    try:
        routes = RoutesConfig.model_validate(read_routes_file(str(path)))
    except PydanticCustomError as exc:
        raise validation_error("Settings", [({"type": exc.type, "msg": exc.message(), "input": None},  # type: ignore[typeddict-item]
                                             ("routes_file",))]) from None
    except ValidationError as exc:
        errors = [(error, ("routes_file", *error["loc"])) for error in exc.errors()]
        raise validation_error("Settings", errors) from None
    return {**data, "routes": routes}
