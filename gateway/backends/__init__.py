"""Generator backends, chosen by name (``GATEWAY_BACKEND``).

The names are resolved by ``config.backends``: ``BUILTIN_BACKENDS`` (import strings, so
only the chosen module is imported), then the ``gateway.backends`` entry-point group, or
``package.module:attr`` from anywhere. The object found is called with the ``Settings``,
whose ``backend_settings`` already hold the backend's own settings model, when it has one.
"""

from __future__ import annotations

from config import Settings
from config.backends import (
    BUILTIN_BACKENDS,
    ENTRY_POINT_GROUP,
    BackendLoadError,
    backend_settings_model,
    resolve_backend_factory,
)
from gateway.backends.base import (
    Backend,
    BackendSettings,
    ChatTurn,
    Chunk,
    ContentPart,
    FinishChunk,
    GenerationRequest,
    ImagePart,
    ReasoningChunk,
    TextPart,
    TokenChunk,
    Tool,
    ToolCall,
    ToolCallChunk,
    refusal,
)
from gateway.metrics import Metrics


def load_backend(settings: Settings, metrics: Metrics | None = None) -> Backend:
    """The backend ``GATEWAY_BACKEND`` names, or with routes configured the router over
    their deployments (which labels its figures in ``metrics``)."""
    if settings.routes is not None:
        from gateway.backends.router import RouterBackend

        return RouterBackend(settings, metrics)
    factory = resolve_backend_factory(settings.backend)
    # Settings leave a name that loads nothing, or a wrongly declared model, for here to report.
    backend_settings_model(factory)
    backend = factory(settings)
    if not isinstance(backend, Backend):
        raise BackendLoadError(f"backend {settings.backend!r} does not implement the Backend interface")
    return backend


__all__ = [
    "BUILTIN_BACKENDS",
    "ENTRY_POINT_GROUP",
    "Backend",
    "BackendLoadError",
    "BackendSettings",
    "ChatTurn",
    "Chunk",
    "ContentPart",
    "FinishChunk",
    "GenerationRequest",
    "ImagePart",
    "ReasoningChunk",
    "TextPart",
    "TokenChunk",
    "Tool",
    "ToolCall",
    "ToolCallChunk",
    "load_backend",
    "refusal",
    "resolve_backend_factory",
]
