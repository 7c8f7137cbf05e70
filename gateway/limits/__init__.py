"""Per-user limit stores: ``memory`` (one process) or ``redis`` (cluster-wide)."""

from gateway.limits.base import Lease, LimitStore

__all__ = ["Lease", "LimitStore"]
