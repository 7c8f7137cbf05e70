"""``gateway serve``: checks what would otherwise fail inside uvicorn's startup, then runs
one process, or several workers sharing one listening socket."""

from __future__ import annotations

import anyio
from fastapi import FastAPI

from config import Settings
from gateway.app import create_app
from gateway.cluster import build_cluster
from gateway.transport.supervisor import run_workers
from gateway.transport.uvicorn import GatewayServer, listening_socket, uvicorn_config


class ConfigurationError(RuntimeError):
    pass


def worker_app() -> FastAPI:
    """The app factory each worker process calls (settings from its environment)."""
    return create_app(Settings())


def preflight(settings: Settings) -> bool:
    """Fail fast, with a clear message, on what would otherwise fail inside uvicorn's
    startup: the cluster must be reachable. Returns whether it is shared between processes."""
    cluster = build_cluster(settings)

    async def check() -> None:
        try:
            await cluster.start(lambda name, loop: None)
        finally:
            await cluster.aclose()

    anyio.run(check)
    return cluster.shared


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    shared = preflight(settings)
    if settings.workers > 1:
        if not shared:
            raise ConfigurationError(
                f"--workers {settings.workers} needs a shared cluster (GATEWAY_CLUSTER_URL=redis://…, or its old name "
                "GATEWAY_REDIS_URL): without it "
                "each worker would keep its own limits and streams, so per-user limits would multiply and a client "
                "could not resume on another worker"
            )
        if settings.auth == "jwt" and not settings.has_jwt_key:
            raise ConfigurationError(
                "several workers need a shared key (GATEWAY_JWT_SECRET or a public key): a generated development "
                "secret would differ per worker"
            )
        config = uvicorn_config(
            "gateway.serve:worker_app", settings, host=host, port=port, factory=True, workers=settings.workers
        )
        run_workers(config, [listening_socket(config)], settings.workers, settings.drain_timeout_s)
        return
    app = create_app(settings)
    server = GatewayServer(uvicorn_config(app, settings, host=host, port=port), app.state.hub)
    server.run()
