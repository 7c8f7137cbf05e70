"""AI token-streaming WebSocket gateway. ``create_app(settings)`` builds the application.

``create_app`` is imported on first use, so importing a part of the package (the client,
the protocol) does not import the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from gateway.app import create_app

        return create_app
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")


__all__ = ["create_app"]
