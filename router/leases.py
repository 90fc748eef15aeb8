"""Partition leases in Redis: at most one router works a partition at a time.

A lease is a key holding the owner's id with a TTL. It is taken with
``SET NX PX``, renewed and released only by its holder (compare-and-set in
Lua), so a router that stalls past the TTL loses its partitions instead of
processing them beside the new owner.
"""

from __future__ import annotations

import time
from typing import Any

from common.backends.redis_client import RedisHandle

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Leases:
    """Acquire, renew and release partition leases for one router."""

    def __init__(self, handle: RedisHandle, owner: str, ttl_seconds: float) -> None:
        self.redis = handle
        self.owner = owner.encode()
        self.ttl_ms = int(ttl_seconds * 1000)
        # partition -> monotonic deadline until which our lease is certainly valid
        self.valid_until: dict[int, float] = {}
        # held() answered, and until when that answer stands (the earliest deadline in
        # it); the consume loop asks twice per read, over 64+ partitions.
        self._held: tuple[float, list[int]] = (0.0, [])

    def holds(self, partition: int) -> bool:
        return time.monotonic() < self.valid_until.get(partition, 0.0)

    def held(self) -> list[int]:
        """The partitions whose leases are valid now, in order (a fresh list)."""
        now = time.monotonic()
        stands_until, partitions = self._held
        if now < stands_until:
            return list(partitions)
        valid = [(p, until) for p, until in self.valid_until.items() if until > now]
        partitions = sorted(p for p, _ in valid)
        self._held = (min((until for _, until in valid), default=0.0), partitions)
        return list(partitions)

    def _changed(self) -> None:
        self._held = (0.0, [])

    def suspend(self) -> None:
        """Stop trusting our leases until the next successful ``renew``.

        Called when Redis fails under us: if it comes back empty, the lease keys are
        gone and another router may take a partition at once, while our local
        deadlines would still say we hold it; two routers would then read the same
        partition. Suspended leases are still renewed (or found lost) by ``renew``.
        """
        for p in self.valid_until:
            self.valid_until[p] = 0.0
        self._changed()

    async def acquire(self, partitions: list[int]) -> list[int]:
        if not partitions:
            return []
        started = time.monotonic()

        async def op(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                for p in partitions:
                    pipe.set(self.redis.keys.lease(p), self.owner, nx=True, px=self.ttl_ms)
                return await pipe.execute()

        results = await self.redis.run(op)
        won = [p for p, ok in zip(partitions, results, strict=True) if ok]
        for p in won:
            self.valid_until[p] = started + self.ttl_ms / 1000 * 0.8
        self._changed()
        return won

    async def renew(self) -> list[int]:
        """Renew every lease we hold; returns the partitions we lost."""
        partitions = sorted(self.valid_until)
        if not partitions:
            return []
        started = time.monotonic()

        # Every second, one script call per held partition: on a lane, hiredis packs
        # them (redis-py's pipeline packed 64 in Python, a ~1 ms pause of the loop).
        keys = self.redis.keys
        results = await self.redis.execute(
            [("EVAL", RENEW, 1, keys.lease(p), self.owner, self.ttl_ms) for p in partitions])
        lost = []
        for p, ok in zip(partitions, results, strict=True):
            if ok:
                self.valid_until[p] = started + self.ttl_ms / 1000 * 0.8
            else:
                lost.append(p)
                self.valid_until.pop(p, None)
        self._changed()
        return lost

    async def release(self, partitions: list[int]) -> None:
        for p in partitions:
            self.valid_until.pop(p, None)
        self._changed()
        if not partitions:
            return

        async def op(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                for p in partitions:
                    pipe.eval(RELEASE, 1, self.redis.keys.lease(p), self.owner)
                return await pipe.execute()

        await self.redis.run(op)
