"""``StatsStore`` in Redis: buffered increments flushed once a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from common.backends.redis_client import RedisHandle
from common.stats import FIELDS, MemoryStats

log = logging.getLogger("ara.stats")
FLUSH_SECONDS = 1.0


class RedisStats:
    """Send counters shared by the cluster; the unflushed part is added on read."""

    def __init__(self, handle: RedisHandle) -> None:
        self.redis = handle
        self.pending = MemoryStats()
        self._task: asyncio.Task[None] | None = None

    def add(self, tenant_id: str, sent: int, delivered: int, failed: int, queued: int) -> None:
        self.pending.add(tenant_id, sent, delivered, failed, queued)

    async def totals(self, tenant_id: str) -> dict[str, int]:
        async def op(r: Any) -> Any:
            return await r.hgetall(self.redis.keys.stats(tenant_id))

        stored = await self.redis.run(op)
        local = await self.pending.totals(tenant_id)
        return {f: int(stored.get(f.encode(), 0)) + local[f] for f in FIELDS}

    async def tenants(self) -> list[str]:
        async def op(r: Any) -> Any:
            return await r.smembers(self.redis.keys.tenants)

        names = {t.decode() for t in await self.redis.run(op)}
        return sorted(names | set(await self.pending.tenants()))

    async def flush(self) -> None:
        taken = self.pending.take()
        if not taken:
            return

        async def op(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                for tenant, counts in taken.items():
                    for field, value in counts.items():
                        if value:
                            pipe.hincrby(self.redis.keys.stats(tenant), field, value)
                    pipe.sadd(self.redis.keys.tenants, tenant)
                await pipe.execute()

        try:
            await self.redis.run(op)
        except Exception:
            for tenant, counts in taken.items():  # keep them for the next flush
                self.pending.add(tenant, *(counts[f] for f in FIELDS))
            raise

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=2)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception as exc:
                log.debug("stats flush postponed: %s", exc)
