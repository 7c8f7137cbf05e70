"""Backend names: what a ``GATEWAY_BACKEND`` value loads.

A name is looked up in ``BUILTIN_BACKENDS`` (import strings, as uvicorn's config maps its
names to implementations, so only the chosen backend's module is imported), then in the
``gateway.backends`` entry-point group; ``package.module:attr`` loads a class or factory
from anywhere. Modules are imported by name only, so nothing here imports ``gateway`` and
config stays below it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

BUILTIN_BACKENDS: dict[str, str] = {
    "echo": "gateway.backends.echo:EchoBackend",
    "synthetic": "gateway.backends.synthetic:SyntheticBackend",
    "openai": "gateway.backends.openai:OpenAIBackend",
    "transformers": "gateway.backends.transformers:TransformersBackend",
}

ENTRY_POINT_GROUP = "gateway.backends"

BackendFactory = Callable[..., object]


class BackendLoadError(RuntimeError):
    """A ``GATEWAY_BACKEND`` value that names nothing loadable."""


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
