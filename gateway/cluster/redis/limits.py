"""Per-user limits that hold across every gateway process, kept in Redis.

Counts live in one hash per user and kind (``{<user>}:c:conn``, ``{<user>}:c:gen``), two
fields per process: ``<node id>``, its count, and ``<node id>:exp``, the time (Redis's
clock, in ms) until which that count holds. The check-and-increment is one Lua script,
which drops the fields of processes whose time has passed, so a crashed process's slots
come back by themselves within about ``GATEWAY_NODE_TTL_S``. Every process pushes the time
of the users it holds slots for forward every third of that (one pipeline). The generate
rate is a token bucket in a hash (``{<user>}:rate``), refilled with Redis's own clock. A
script touches only keys of one user, so one cluster slot.

While Redis is unreachable the limits fall back to this process's own (memory) limits,
and leases remember which store granted them.
"""

from __future__ import annotations

import logging

import anyio
from redis.exceptions import RedisError

from config import Settings
from gateway.cluster.base import Lease
from gateway.cluster.memory import MemoryLimitStore, too_many_streams
from gateway.cluster.redis.context import RedisContext
from gateway.wire.errors import RateLimited

logger = logging.getLogger("gateway.limits")

# Sums KEYS[1]'s per-process counts into ``total``, dropping the fields of processes whose
# time (``<node>:exp``) has passed. ARGV[2] is this process, always counted; ARGV[3] the
# time its count holds for, in ms.
_LIVE_TOTAL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = redis.call('HGETALL', KEYS[1])
local counts = {}
local expiry = {}
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, -4) == ':exp' then
    expiry[string.sub(name, 1, -5)] = tonumber(fields[i + 1])
  else
    counts[name] = tonumber(fields[i + 1])
  end
end
local total = 0
for node, count in pairs(counts) do
  local until_ms = expiry[node]
  if node ~= ARGV[2] and (until_ms == nil or until_ms < now) then
    redis.call('HDEL', KEYS[1], node, node .. ':exp')
  else
    -- A release that outlived its count (Redis lost the hash in between) can leave a
    -- negative field: it never lowers the total.
    total = total + math.max(0, count)
  end
end
-- A time left without its count (refreshed just as its process's count went) goes too.
for node, until_ms in pairs(expiry) do
  if counts[node] == nil and until_ms < now then
    redis.call('HDEL', KEYS[1], node .. ':exp')
  end
end
local function take()
  redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  redis.call('HSET', KEYS[1], ARGV[2] .. ':exp', now + tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[1], 86400)
end
"""

# KEYS[1] counts hash. ARGV: limit, this node, its time to live (ms).
_ACQUIRE_SLOT = _LIVE_TOTAL + """
if total >= tonumber(ARGV[1]) then return 0 end
take()
return 1
"""

# KEYS[1] counts hash, KEYS[2] bucket hash. ARGV: limit, node, its time to live (ms), rate,
# burst. Returns {1, ""} when granted, {0, "streams"} at the concurrency limit,
# {0, "<seconds>"} when rate limited.
_ACQUIRE_GENERATION = _LIVE_TOTAL + """
if total >= tonumber(ARGV[1]) then return {0, 'streams'} end
local rate = tonumber(ARGV[4])
local burst = tonumber(ARGV[5])
local now_s = now / 1000
local state = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now_s
tokens = math.min(burst, tokens + math.max(0, now_s - ts) * rate)
if tokens < 1 then
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(now_s))
  return {0, tostring((1 - tokens) / rate)}
end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'ts', tostring(now_s))
redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
take()
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
        # The count hashes this process holds slots in, with how many: their times are
        # pushed forward while it does.
        self.held: dict[str, int] = {}

    def _hold(self, key: str, change: int) -> None:
        count = self.held.get(key, 0) + change
        if count > 0:
            self.held[key] = count
        else:
            self.held.pop(key, None)

    async def refresh(self) -> None:
        """Keep this process's counts alive: every third of the node TTL, the time of each
        count hash it holds slots in moves to Redis's clock plus the TTL (one pipeline)."""
        interval = max(self.ctx.node_ttl_s / 3, 0.2)
        field = self.ctx.node_id + ":exp"
        while True:
            await anyio.sleep(interval)
            if not self.held:
                continue
            try:
                seconds, micros = await self.ctx.client.time()
                until_ms = int(seconds) * 1000 + int(micros) // 1000 + self.ctx.node_ttl_ms
                pipe = self.ctx.client.pipeline(transaction=False)
                for key in list(self.held):
                    pipe.hset(key, field, until_ms)
                await pipe.execute()
                self.ctx.report(True)
            except (RedisError, OSError) as exc:
                self.ctx.report_error(exc)

    def _lease(self, key: str) -> Lease:
        self._hold(key, 1)

        async def release() -> None:
            self._hold(key, -1)
            try:
                # One command: a field at zero stays until the next acquire (it counts
                # nothing), and the hash expires with the user's inactivity.
                await self.ctx.client.hincrby(key, self.ctx.node_id, -1)
            except (RedisError, OSError):
                # The count is kept per process: a lost decrement is dropped with the
                # count once this process stops holding slots of this user and its time
                # passes, so it does not leak for long.
                logger.warning("could not release a per-user slot in Redis")

        return Lease(release)

    async def add_connection(self, user: str) -> Lease | None:
        key = self.ctx.user_key(user, "c", "conn")
        try:
            granted = await self._acquire_slot(
                keys=[key], args=[self.settings.max_connections_per_user, self.ctx.node_id, self.ctx.node_ttl_ms])
            self.ctx.report(True)
        except (RedisError, OSError) as exc:
            self.ctx.report_error(exc)
            return self.local.add_connection_now(user)
        return self._lease(key) if granted else None

    async def acquire_generation(self, user: str) -> Lease:
        key = self.ctx.user_key(user, "c", "gen")
        bucket = self.ctx.user_key(user, "rate")
        try:
            granted, detail = await self._acquire_generation(
                keys=[key, bucket],
                args=[self.settings.max_streams_per_user, self.ctx.node_id, self.ctx.node_ttl_ms,
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
