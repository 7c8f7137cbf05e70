"""Per-user limits that hold across every gateway process, kept in Redis.

Counts live in one hash per user and kind, a field per process (``<node id>`` -> count).
The check-and-increment is one Lua script, which also drops the fields of processes
whose liveness key has expired, so a crashed process's slots come back by themselves.
The generate rate is a token bucket in a hash, refilled with Redis's own clock.

While Redis is unreachable the limits fall back to this process's own (memory) limits,
and leases remember which store granted them.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from config import Settings
from gateway.cluster.base import Lease
from gateway.cluster.memory import MemoryLimitStore, too_many_streams
from gateway.cluster.redis.context import RedisContext
from gateway.wire.errors import RateLimited

logger = logging.getLogger("gateway.limits")

# Sums KEYS[1]'s per-process counts into ``total``, dropping the fields of processes whose
# liveness key (ARGV[3] .. node) has expired. ARGV[2] is this process, always counted.
_LIVE_TOTAL = """
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local node = fields[i]
  if node ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. node) == 0 then
    redis.call('HDEL', KEYS[1], node)
  else
    -- A release that outlived its count (Redis lost the hash in between) can leave a
    -- negative field: it never lowers the total.
    total = total + math.max(0, tonumber(fields[i + 1]))
  end
end
"""

# KEYS[1] counts hash. ARGV: limit, this node, node-key prefix.
_ACQUIRE_SLOT = _LIVE_TOTAL + """
if total >= tonumber(ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], 86400)
return 1
"""

# KEYS[1] counts hash, KEYS[2] bucket hash. ARGV: limit, node, node-key prefix, rate, burst.
# Returns {1, ""} when granted, {0, "streams"} at the concurrency limit, {0, "<seconds>"}
# when rate limited.
_ACQUIRE_GENERATION = _LIVE_TOTAL + """
if total >= tonumber(ARGV[1]) then return {0, 'streams'} end
local rate = tonumber(ARGV[4])
local burst = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
if tokens < 1 then
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(now))
  return {0, tostring((1 - tokens) / rate)}
end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], 86400)
return {1, ''}
"""



class RedisLimitStore:
    name = "redis"

    def __init__(self, settings: Settings, context: RedisContext) -> None:
        self.settings = settings
        self.ctx = context
        self.local = MemoryLimitStore(settings)
        client = context.client
        self._acquire_slot = client.register_script(_ACQUIRE_SLOT)
        self._acquire_generation = client.register_script(_ACQUIRE_GENERATION)

    def _lease(self, key: str) -> Lease:
        async def release() -> None:
            try:
                # One command: a field at zero stays until the next acquire (it counts
                # nothing), and the hash expires with the user's inactivity.
                await self.ctx.client.hincrby(key, self.ctx.node_id, -1)
            except (RedisError, OSError):
                # The count is kept per process: it is dropped when this process's
                # liveness key expires, so a lost decrement does not leak for long.
                logger.warning("could not release a per-user slot in Redis")

        return Lease(release)

    async def add_connection(self, user: str) -> Lease | None:
        key = self.ctx.key("c", "conn", user)
        try:
            granted = await self._acquire_slot(
                keys=[key], args=[self.settings.max_connections_per_user, self.ctx.node_id, self.ctx.key("node", "")])
            self.ctx.report(True)
        except (RedisError, OSError) as exc:
            self.ctx.report_error(exc)
            return self.local.add_connection_now(user)
        return self._lease(key) if granted else None

    async def acquire_generation(self, user: str) -> Lease:
        key = self.ctx.key("c", "gen", user)
        bucket = self.ctx.key("rate", user)
        try:
            granted, detail = await self._acquire_generation(
                keys=[key, bucket],
                args=[self.settings.max_streams_per_user, self.ctx.node_id, self.ctx.key("node", ""),
                      self.settings.user_generate_rate_per_s, self.settings.user_generate_burst])
            self.ctx.report(True)
        except (RedisError, OSError) as exc:
            self.ctx.report_error(exc)
            return self.local.acquire_generation_now(user)
        if granted:
            return self._lease(key)
        if detail == "streams":
            raise too_many_streams(self.settings.max_streams_per_user)
        raise RateLimited("too many generate requests", retry_after_s=float(detail))
