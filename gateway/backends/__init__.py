"""Generator backends, chosen by name (``GATEWAY_BACKEND``).

A name is looked up in ``BUILTIN_BACKENDS`` (import strings, so only the chosen module is
imported), then in the ``gateway.backends`` entry-point group; ``package.module:attr``
loads a class or factory from anywhere. The object found is called with the ``Settings``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from config import Settings
from gateway.backends.base import (
    Backend,
    ChatTurn,
    Chunk,
    FinishChunk,
    GenerationRequest,
    TokenChunk,
)

BUILTIN_BACKENDS: dict[str, str] = {
    "echo": "gateway.backends.echo:EchoBackend",
    "synthetic": "gateway.backends.synthetic:SyntheticBackend",
    "openai": "gateway.backends.openai:OpenAIBackend",
    "transformers": "gateway.backends.transformers:TransformersBackend",
}

ENTRY_POINT_GROUP = "gateway.backends"


class BackendLoadError(RuntimeError):
    pass


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


def resolve_backend_factory(name: str) -> Any:
    if name in BUILTIN_BACKENDS:
        return _import_attr(BUILTIN_BACKENDS[name])
    if ":" in name:
        return _import_attr(name)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == name:
            return entry_point.load()
    known = sorted(BUILTIN_BACKENDS) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise BackendLoadError(f"unknown backend {name!r}; known: {', '.join(known)}")


def load_backend(settings: Settings) -> Backend:
    factory = resolve_backend_factory(settings.backend)
    backend = factory(settings)
    if not isinstance(backend, Backend):
        raise BackendLoadError(f"backend {settings.backend!r} does not implement the Backend interface")
    return backend


__all__ = [
    "BUILTIN_BACKENDS",
    "ENTRY_POINT_GROUP",
    "Backend",
    "BackendLoadError",
    "ChatTurn",
    "Chunk",
    "FinishChunk",
    "GenerationRequest",
    "TokenChunk",
    "load_backend",
    "resolve_backend_factory",
]
