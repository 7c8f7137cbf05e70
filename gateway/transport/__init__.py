"""Serving the gateway: the uvicorn integration (bounded socket writes, forced close,
drain before uvicorn's shutdown) and the supervisor of worker processes."""
