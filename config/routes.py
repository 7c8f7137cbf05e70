"""Routes: several deployments (upstreams) behind one model name, read from
``GATEWAY_ROUTES_FILE`` (JSON or TOML, by extension) or ``GATEWAY_ROUTES`` (inline JSON).

Everything is validated when the settings are built, so a bad file stops the gateway at
start with the field named (``routes.chat.deployments.0.base_url``). A deployment's
fields other than the routing ones below are its backend's settings, validated by that
backend's own model but never filled from the environment: a deployment gets exactly what
its entry says, plus its API key, read from the variable ``api_key_env`` names. A secret
never appears in the file, and never in an error: only the variable's name does.
"""

from __future__ import annotations

import functools
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import PydanticCustomError, from_json
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from config.backends import BackendLoadError, BackendSettings, settings_model_for, validation_error

Strategy = Literal["weighted", "least_busy", "lowest_latency"]
MidstreamPolicy = Literal["error", "continue"]

# The fields of a deployment that are the router's; all others are the backend's.
ROUTING_FIELDS = frozenset({"name", "backend", "weight", "max_concurrency", "api_key_env",
                            "connect_timeout_s", "first_token_timeout_s", "idle_timeout_s"})
# Backend fields a file may not hold, with where the value comes from instead.
SECRET_FIELDS = {"api_key": "api_key_env"}


def _error(kind: str, message: str, loc: tuple[int | str, ...], value: object = None) -> ValidationError:
    return validation_error("Routes", [({"type": kind, "msg": message, "input": value}, loc)])  # type: ignore[typeddict-item]


class Cooldown(BaseModel):
    """A deployment that fails ``allowed_fails`` times within ``window_s`` gets no traffic
    for ``cooldown_s``; then one request probes it."""

    model_config = ConfigDict(extra="forbid")

    allowed_fails: int = Field(default=3, ge=1)
    window_s: float = Field(default=30.0, gt=0)
    cooldown_s: float = Field(default=30.0, gt=0)


class Deployment(BaseModel):
    model_config = ConfigDict(extra="allow", hide_input_in_errors=True)

    name: str = Field(min_length=1)
    backend: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    max_concurrency: int | None = Field(default=None, ge=1)
    api_key_env: str | None = Field(default=None, min_length=1)
    # Default: the GATEWAY_UPSTREAM_… settings.
    connect_timeout_s: float | None = Field(default=None, gt=0)
    first_token_timeout_s: float | None = Field(default=None, gt=0)
    idle_timeout_s: float | None = Field(default=None, gt=0)

    _backend_settings: BackendSettings | None = PrivateAttr(default=None)

    @property
    def backend_settings(self) -> BackendSettings | None:
        """The backend's own settings model, built from this entry (and its API key)."""
        return self._backend_settings

    @model_validator(mode="after")
    def _build_backend_settings(self) -> Deployment:
        own = dict(self.model_extra or {})
        for field, instead in SECRET_FIELDS.items():
            if field in own:
                raise _error("secret_in_file", f"a secret does not belong in the routes: name the variable "
                             f"that holds it with {instead}", (field,))
        try:
            model = settings_model_for(self.backend)
        except BackendLoadError as exc:
            raise _error("unknown_backend", str(exc), ("backend",), self.backend) from None
        if model is None:
            if own:
                raise _error("unknown_field", f"backend {self.backend!r} has no settings; unknown field "
                             f"{sorted(own)[0]!r}", (sorted(own)[0],))
            if self.api_key_env is not None:
                raise _error("unknown_field", f"backend {self.backend!r} takes no API key", ("api_key_env",))
            return self
        for field in own:
            if field not in model.model_fields:
                raise _error("unknown_field", f"not a field of a deployment or of the {self.backend} backend",
                             (field,))
        if self.api_key_env is not None:
            if "api_key" not in model.model_fields:
                raise _error("unknown_field", f"backend {self.backend!r} takes no API key", ("api_key_env",))
            key = os.environ.get(self.api_key_env)
            if not key:
                raise _error("missing_variable", f"the variable {self.api_key_env} is not set", ("api_key_env",))
            own["api_key"] = key
        try:
            self._backend_settings = _from_the_entry_only(model)(**own)
        except ValidationError as exc:
            raise validation_error("Routes", [(error, error["loc"]) for error in exc.errors()]) from None
        return self


@functools.cache
def _from_the_entry_only(model: type[BackendSettings]) -> type[BackendSettings]:
    """``model`` read from its keywords only: a deployment never picks up the environment's
    or ``.env``'s ``GATEWAY_<BACKEND>_*`` values, which are another upstream's."""

    class FromTheEntry(model):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                       **others: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings,)

    FromTheEntry.__name__ = FromTheEntry.__qualname__ = model.__name__
    return FromTheEntry


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = "weighted"
    retries: int = Field(default=2, ge=0)
    fallbacks: list[str] = []
    on_midstream_failure: MidstreamPolicy = "error"
    deployments: list[Deployment] = Field(min_length=1)


class RoutesConfig(BaseModel):
    """The whole routes file."""

    model_config = ConfigDict(extra="forbid")

    default_route: str | None = None
    cooldown: Cooldown = Cooldown()
    routes: dict[str, Route] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> RoutesConfig:
        seen: dict[str, str] = {}
        for route_name, route in self.routes.items():
            if not route_name:
                raise _error("route_name", "a route needs a name", ("routes",))
            for index, deployment in enumerate(route.deployments):
                if deployment.name in seen:
                    raise _error("duplicate_deployment",
                                 f"deployment name {deployment.name!r} is also used in route {seen[deployment.name]!r};"
                                 " names must be unique across the file",
                                 ("routes", route_name, "deployments", index, "name"), deployment.name)
                seen[deployment.name] = route_name
            for index, fallback in enumerate(route.fallbacks):
                if fallback not in self.routes:
                    raise _error("unknown_route", f"no route named {fallback!r}; routes: {', '.join(self.routes)}",
                                 ("routes", route_name, "fallbacks", index), fallback)
                if fallback == route_name:
                    raise _error("unknown_route", "a route cannot be its own fallback",
                                 ("routes", route_name, "fallbacks", index), fallback)
        if self.default_route is not None and self.default_route not in self.routes:
            raise _error("unknown_route", f"no route named {self.default_route!r}; routes: {', '.join(self.routes)}",
                         ("default_route",), self.default_route)
        return self

    def route_for(self, model: str | None) -> str | None:
        """The route a request's ``model`` names (None: ``default_route``, or the only route)."""
        if model is None:
            if self.default_route is not None:
                return self.default_route
            return next(iter(self.routes)) if len(self.routes) == 1 else None
        return model if model in self.routes else None


def read_routes_file(path: str) -> Any:
    """The file's content, parsed as TOML (``.toml``) or JSON (anything else). Raises
    ``PydanticCustomError`` naming what is wrong with the file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PydanticCustomError("routes_file", "cannot read {path}: {reason}",
                                  {"path": path, "reason": exc.strerror or type(exc).__name__}) from None
    try:
        if file.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return from_json(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if file.suffix.lower() == ".toml" else "JSON"
        raise PydanticCustomError("routes_file", "{path} is not valid {kind}: {reason}",
                                  {"path": path, "kind": kind, "reason": str(exc).splitlines()[0]}) from None
