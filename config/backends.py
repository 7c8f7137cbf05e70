"""Backend names: what a ``GATEWAY_BACKEND`` value loads, and the chosen backend's own
settings model, built from the environment with that model's ``GATEWAY_<NAME>_`` prefix.

A name is looked up in ``BUILTIN_BACKENDS`` (import strings, as uvicorn's config maps its
names to implementations, so only the chosen backend's module is imported), then in the
``gateway.backends`` entry-point group; ``package.module:attr`` loads a class or factory
from anywhere. A factory names its settings model, a ``BackendSettings`` subclass, with a
``settings_model`` attribute; one without it has no settings. Modules are imported by name
only, so nothing here imports ``gateway`` and config stays below it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, get_args

from pydantic import ValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "GATEWAY_"

BUILTIN_BACKENDS: dict[str, str] = {
    "echo": "gateway.backends.echo:EchoBackend",
    "synthetic": "gateway.backends.synthetic:SyntheticBackend",
    "openai": "gateway.backends.openai:OpenAIBackend",
    "transformers": "gateway.backends.transformers:TransformersBackend",
}

ENTRY_POINT_GROUP = "gateway.backends"

BackendFactory = Callable[..., object]


class BackendLoadError(RuntimeError):
    """A ``GATEWAY_BACKEND`` value that names nothing loadable, or a backend that declares
    its settings model wrongly."""


class BackendSettings(BaseSettings):
    """The base of every backend's settings model: read like ``Settings`` (``.env``, empty
    values mean the default, no value in a validation error). A subclass sets its own
    ``env_prefix``, ``GATEWAY_<NAME>_``, and its fields drop it: ``base_url`` of
    ``GATEWAY_OPENAI_`` reads ``GATEWAY_OPENAI_BASE_URL``."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,
        hide_input_in_errors=True,
    )


def _import_attr(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BackendLoadError(f"backend {spec!r} is not of the form package.module:attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendLoadError(f"cannot import backend module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise BackendLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    return target


def resolve_backend_factory(name: str) -> BackendFactory:
    """The class or factory a ``GATEWAY_BACKEND`` value names; only its module is imported."""
    if name in BUILTIN_BACKENDS:
        found = _import_attr(BUILTIN_BACKENDS[name])
    elif ":" in name:
        found = _import_attr(name)
    else:
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name == name:
                found = entry_point.load()
                break
        else:
            known = sorted(BUILTIN_BACKENDS) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
            raise BackendLoadError(f"unknown backend {name!r}; known: {', '.join(known)}")
    if not callable(found):
        raise BackendLoadError(f"backend {name!r} is a {type(found).__name__}, not a class or factory")
    factory: BackendFactory = found
    return factory


def backend_settings_model(factory: BackendFactory) -> type[BackendSettings] | None:
    """The settings model ``factory`` declares in ``settings_model``, or None."""
    model = getattr(factory, "settings_model", None)
    if model is None:
        return None
    owner = getattr(factory, "__qualname__", repr(factory))
    if not (isinstance(model, type) and issubclass(model, BackendSettings)):
        raise BackendLoadError(f"{owner}.settings_model must be a subclass of BackendSettings")
    prefix = _env_prefix(model)
    if not prefix.upper().startswith(ENV_PREFIX) or len(prefix) <= len(ENV_PREFIX):
        raise BackendLoadError(
            f"{model.__name__} must set an env_prefix of its own after {ENV_PREFIX}, such as {ENV_PREFIX}SHOUT_")
    return model


def settings_model_for(name: str) -> type[BackendSettings] | None:
    """The settings model of the backend ``name`` names, or None when it has none."""
    return backend_settings_model(resolve_backend_factory(name))


def flat_prefix(model: type[BackendSettings]) -> str:
    """How ``Settings`` would name the model's fields: its ``env_prefix`` after ``GATEWAY_``,
    lower-cased (``openai_``, so ``base_url`` is ``openai_base_url``, the variable's name
    without ``GATEWAY_``)."""
    return _env_prefix(model)[len(ENV_PREFIX):].lower()


def _env_prefix(model: type[BackendSettings]) -> str:
    return str(model.model_config.get("env_prefix", ""))


def load_backend_settings(
    name: str, given: object = None, options: Mapping[str, Any] | None = None
) -> BackendSettings | None:
    """The settings of backend ``name``: ``given`` when it is an instance of the backend's
    model; otherwise the model built from the environment and ``.env``, with ``given``'s
    fields (a dict) taking precedence, as keywords do over the environment in any
    ``BaseSettings``. ``options`` are source options for the model (``_env_file``…).

    Raises ``BackendLoadError`` when ``name`` loads nothing, and ``ValidationError`` whose
    locations are named as ``Settings`` names its own (``openai_base_url``), so that
    ``GATEWAY_`` plus a location is the variable to fix.
    """
    model = settings_model_for(name)
    if model is None:
        if given is None:
            return None
        raise _settings_error(given, f"backend {name!r} has no settings model, so backend_settings must be None")
    if isinstance(given, model):
        return given
    if given is not None and not isinstance(given, Mapping):
        raise _settings_error(
            given,
            f"backend {name!r} takes {model.__name__}, or a dict of its fields, not {type(given).__name__} "
            f"(in the environment: the {_env_prefix(model)}* variables)",
        )
    try:
        return model(**{**(options or {}), **(given or {})})
    except ValidationError as exc:
        prefix = flat_prefix(model)
        raise validation_error(
            exc.title,
            [(error, (f"{prefix}{error['loc'][0]}" if error["loc"] else prefix.rstrip("_"), *error["loc"][1:]))
             for error in exc.errors()],
        ) from None


_KNOWN_ERROR_TYPES = frozenset(get_args(ErrorType))


def validation_error(title: str, errors: list[tuple[ErrorDetails, tuple[int | str, ...]]]) -> ValidationError:
    """A ``ValidationError`` of the given errors, each at the location paired with it. Raised
    in a validator, its errors become that model's own."""
    details: list[InitErrorDetails] = []
    for error, loc in errors:
        kind = error["type"]
        if kind in _KNOWN_ERROR_TYPES:
            detail: InitErrorDetails = {"type": kind, "loc": loc, "input": error["input"]}
            if "ctx" in error:
                detail["ctx"] = error["ctx"]
        else:  # a validator's own PydanticCustomError: its message is kept as written
            detail = {"type": PydanticCustomError(kind, error["msg"]), "loc": loc, "input": error["input"]}
        details.append(detail)
    return ValidationError.from_exception_data(title, details, hide_input=True)


def _settings_error(given: object, message: str) -> ValidationError:
    return ValidationError.from_exception_data(
        "Settings",
        [{"type": PydanticCustomError("backend_settings", message), "loc": ("backend_settings",), "input": given}],
        hide_input=True,
    )
