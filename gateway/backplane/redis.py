"""Backplane on Redis pub/sub: one channel, ``<prefix>ctl``, that every process listens to.

One channel keeps subscription management trivial and every message reaches every
process; the cost is that room traffic is delivered to processes without members, which
drop it. The listener is supervised: when Redis goes away it reconnects with backoff and
resubscribes; messages published meanwhile are lost (pub/sub is at most once), which is
why nothing here carries tokens that exist nowhere else: room frames are also in the
stream store.
"""

from __future__ import annotations

import json
import logging

from redis.exceptions import RedisError

from gateway.backplane.base import ControlMessage, Handler
from gateway.redis_support import RedisContext, RedisUnavailable

logger = logging.getLogger("gateway.backplane")


class RedisBackplane:
    name = "redis"

    def __init__(self, context: RedisContext) -> None:
        self.ctx = context
        self.channel = context.key("ctl")
        self._handler: Handler | None = None

    async def start(self, handler: Handler) -> None:
        self._handler = handler

    async def run(self) -> None:
        """One subscription session; raises when the connection fails (the hub supervises)."""
        pubsub = self.ctx.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self.ctx.report(True)
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    payload = json.loads(message["data"])
                except (TypeError, ValueError):
                    logger.warning("ignoring a malformed backplane message")
                    continue
                if isinstance(payload, dict) and self._handler is not None:
                    try:
                        self._handler(payload)
                    except Exception:
                        logger.exception("backplane handler failed")
        except RedisError as exc:
            raise RedisUnavailable(f"backplane subscription lost: {type(exc).__name__}") from None
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def publish(self, message: ControlMessage) -> None:
        await self.ctx.client.publish(self.channel, json.dumps(message, separators=(",", ":")))

    async def aclose(self) -> None:
        self._handler = None
