"""Stream stores: ``memory`` (one process) or ``redis`` (when GATEWAY_REDIS_URL is set)."""

from gateway.store.base import StreamEvent, StreamMeta, StreamStore, Terminal, TokenBatch

__all__ = ["StreamEvent", "StreamMeta", "StreamStore", "Terminal", "TokenBatch"]
