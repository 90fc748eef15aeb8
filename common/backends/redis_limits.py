"""Cluster-wide rate limits and idempotency records in Redis.

Token buckets run as one Lua script per take, so concurrent gateways share
one bucket per key; the ``Idempotency-Key`` claim is a ``SET NX``.
"""

from __future__ import annotations

import time
from typing import Any

from common.backends.redis_client import RedisHandle

TOKEN_BUCKET = """
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', key, 't', 's')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil then
  tokens = burst
  stamp = now
end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', key, 't', tostring(tokens), 's', tostring(now))
redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisRateLimiter:
    """``RateLimiter`` whose buckets live in Redis."""

    def __init__(self, handle: RedisHandle) -> None:
        self.redis = handle
        self.script = handle.client.register_script(TOKEN_BUCKET)

    async def take(self, key: str, rate: float, burst: float) -> float:
        async def op(r: Any) -> Any:
            return await self.script(
                keys=[self.redis.keys.ratelimit(key)], args=[rate, burst, time.time()]
            )

        return float(await self.redis.run(op))


class RedisIdempotencyStore:
    """``IdempotencyStore`` in Redis, shared by every gateway."""

    def __init__(self, handle: RedisHandle) -> None:
        self.redis = handle

    async def claim(self, key: str, ttl: float) -> bool:
        async def op(r: Any) -> Any:
            return await r.set(self.redis.keys.idempotency(key), b"", nx=True, ex=int(ttl))

        return bool(await self.redis.run(op))

    async def save(self, key: str, record: bytes, ttl: float) -> None:
        async def op(r: Any) -> Any:
            return await r.set(self.redis.keys.idempotency(key), record, ex=int(ttl))

        await self.redis.run(op)

    async def load(self, key: str) -> bytes | None:
        async def op(r: Any) -> Any:
            return await r.get(self.redis.keys.idempotency(key))

        value = await self.redis.run(op)
        return value or None

    async def release(self, key: str) -> None:
        async def op(r: Any) -> Any:
            return await r.delete(self.redis.keys.idempotency(key))

        await self.redis.run(op)
