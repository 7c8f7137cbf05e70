"""Backplane on Redis pub/sub: one channel, ``<prefix>v2:ctl``, that every process listens to.

One channel keeps subscription management trivial and every message reaches every
process; the cost is that room traffic is delivered to processes without members, which
drop it. When Redis goes away ``run`` raises and the cluster's supervisor restarts it with
backoff; messages published meanwhile are lost (pub/sub is at most once), which is why
nothing here carries tokens that exist nowhere else: room tokens are also in the store.
"""

from __future__ import annotations

import logging

import anyio
import orjson
from redis.exceptions import RedisError

from gateway.cluster.base import Handler
from gateway.cluster.control import ControlMessage, MalformedMessage, from_dict, to_dict
from gateway.cluster.redis.context import CLOSE_TIMEOUT_S, RedisContext, RedisUnavailable

logger = logging.getLogger("gateway.backplane")


class RedisBackplane:
    name = "redis"

    def __init__(self, context: RedisContext) -> None:
        self.ctx = context
        self.channel = context.key("ctl")
        self._handler: Handler | None = None

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    async def run(self) -> None:
        """One subscription session; raises when the connection fails. The subscription
        holds a connection for as long as it lives: its own, not one of the command pool."""
        client = self.ctx.dedicated_client(socket_timeout=None, single=False)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self.ctx.report(True)
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    control = from_dict(orjson.loads(message["data"]))
                except (orjson.JSONDecodeError, MalformedMessage, TypeError):
                    logger.warning("ignoring a malformed backplane message")
                    continue
                if self._handler is not None:
                    try:
                        self._handler(control)
                    except Exception:
                        logger.exception("backplane handler failed")
        except (RedisError, OSError) as exc:
            self.ctx.report_error(exc)
            raise RedisUnavailable(f"backplane subscription lost: {type(exc).__name__}") from None
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    async def publish(self, message: ControlMessage) -> None:
        await self.ctx.client.publish(self.channel, orjson.dumps(to_dict(message)))
