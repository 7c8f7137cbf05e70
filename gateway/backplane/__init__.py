"""Backplanes: ``memory`` (one process) or ``redis`` pub/sub (when GATEWAY_REDIS_URL is set)."""

from gateway.backplane.base import Backplane, ControlMessage, Handler

__all__ = ["Backplane", "ControlMessage", "Handler"]
