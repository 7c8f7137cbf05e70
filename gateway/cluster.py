"""Choosing the cluster parts from the settings: all in memory, or all on Redis.

The Redis modules (and redis-py) are imported only when ``GATEWAY_REDIS_URL`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from config import Settings
from gateway.backplane.base import Backplane
from gateway.limits.base import LimitStore
from gateway.store.base import StreamStore

if TYPE_CHECKING:
    from gateway.redis_support import RedisContext


@dataclass
class ClusterParts:
    store: StreamStore
    backplane: Backplane
    limits: LimitStore
    redis: RedisContext | None = None


def require_redis_client() -> None:
    """A clear message instead of an ImportError when redis-py is missing."""
    try:
        import redis  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "GATEWAY_REDIS_URL is set but redis-py is not installed: pip install 'token-gateway[redis]'"
        ) from None


def build_cluster(settings: Settings) -> ClusterParts:
    if settings.redis_url:
        require_redis_client()
        from gateway.backplane.redis import RedisBackplane
        from gateway.limits.redis import RedisLimitStore
        from gateway.redis_support import RedisContext
        from gateway.store.redis import RedisStreamStore

        context = RedisContext(settings, settings.redis_url)
        return ClusterParts(RedisStreamStore(settings, context), RedisBackplane(context),
                            RedisLimitStore(settings, context), context)
    from gateway.backplane.memory import MemoryBackplane
    from gateway.limits.memory import MemoryLimitStore
    from gateway.store.memory import MemoryStreamStore

    return ClusterParts(MemoryStreamStore(settings), MemoryBackplane(), MemoryLimitStore(settings))
