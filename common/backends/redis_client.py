"""The Redis connection, its key layout, and a circuit breaker in front of it.

While Redis is unreachable every call fails fast with ``BackendUnavailable``
(REST turns that into 503 within the client timeout) instead of queueing up;
probes back off exponentially with jitter until Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.backends.redis_lane import Command, RedisLane, connection_options
from common.errors import BackendUnavailable

log = logging.getLogger("ara.redis")
T = TypeVar("T")
BLOCK_SECONDS = 1.0
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key the cluster uses; ``{...}`` hash tags keep Redis Cluster happy."""

    prefix: str = "ara"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def node_info(self) -> str:
        return f"{self.prefix}:nodeinfo"

    @property
    def routers(self) -> str:
        return f"{self.prefix}:routers"

    @property
    def router_info(self) -> str:
        return f"{self.prefix}:routerinfo"

    @property
    def tenants(self) -> str:
        return f"{self.prefix}:tenants"

    def node_mark(self, node_id: str) -> str:
        return f"{self.prefix}:nodemark:{{{node_id}}}"

    def session(self, tenant_id: str, user_id: str) -> str:
        return f"{self.prefix}:sess:{{{tenant_id}:{user_id}}}"

    def channel(self, tenant_id: str, channel: str) -> str:
        return f"{self.prefix}:chan:{{{tenant_id}:{channel}}}"

    def channel_names(self, tenant_id: str) -> str:
        return f"{self.prefix}:chans:{{{tenant_id}}}"

    def tenant_conns(self, tenant_id: str) -> str:
        return f"{self.prefix}:tconn:{{{tenant_id}}}"

    def partition(self, partition: int) -> str:
        return f"{self.prefix}:part:{{{partition:04d}}}"

    def lease(self, partition: int) -> str:
        return f"{self.prefix}:lease:{{{partition:04d}}}"

    def node_stream(self, node_id: str) -> str:
        return f"{self.prefix}:node:{{{node_id}}}"

    def pending_receipt(self, partition: int, notification_id: str) -> str:
        """In its partition's slot, so a router deletes a batch's with one ``DEL``."""
        return f"{self.prefix}:rcpt:{{{partition:04d}}}:{notification_id}"

    def ratelimit(self, key: str) -> str:
        return f"{self.prefix}:rl:{{{key}}}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{{{key}}}"

    @property
    def pubsub_leader(self) -> str:
        return f"{self.prefix}:pubsub-leader"

    def stats(self, tenant_id: str) -> str:
        return f"{self.prefix}:stats:{{{tenant_id}}}"


class CircuitBreaker:
    """Opens after a failure; half-opens after an exponentially growing, jittered delay."""

    def __init__(self, name: str, base_delay: float = 0.25, max_delay: float = 5.0) -> None:
        self.name = name
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.failures = 0
        self.open_until = 0.0
        self.on_change: Callable[[bool], None] | None = None

    @property
    def is_open(self) -> bool:
        return self.failures > 0 and time.monotonic() < self.open_until

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    def record_success(self) -> None:
        if self.failures:
            log.info("%s is reachable again", self.name)
            self.failures = 0
            if self.on_change:
                self.on_change(True)

    def record_failure(self) -> None:
        if self.failures == 0:
            log.warning("%s is unreachable; failing fast", self.name)
            if self.on_change:
                self.on_change(False)
        self.failures += 1
        delay = min(self.max_delay, self.base_delay * 2 ** min(self.failures - 1, 10))
        self.open_until = time.monotonic() + delay * random.uniform(0.5, 1.0)

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        if self.is_open:
            raise BackendUnavailable(self.name, f"{self.name} unavailable")
        try:
            result = await operation()
        except REDIS_DOWN as exc:
            self.record_failure()
            raise BackendUnavailable(self.name, f"{self.name} unavailable: {exc}") from exc
        self.record_success()
        return result


class RedisHandle:
    """One Redis client, its keys and its breaker, shared by the Redis backends."""

    def __init__(self, url: str, prefix: str, timeout: float = 1.0) -> None:
        self.url = url
        self._lanes: list[RedisLane] = []
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            health_check_interval=15,
            retry_on_timeout=False,
            decode_responses=False,
            max_connections=256,
            **connection_options(),
        )
        # Blocking stream reads need a socket timeout longer than their BLOCK.
        self.blocking: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout + BLOCK_SECONDS * 2,
            retry_on_timeout=False,
            decode_responses=False,
            **connection_options(),
        )
        # The per-notification commands (accept, route, deliver) go through lanes.
        self.lane = RedisLane(url, timeout)
        self.timeout = timeout
        self.keys = Keys(prefix)
        self.breaker = CircuitBreaker("redis")

    async def run(self, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        was_healthy = self.breaker.healthy
        try:
            return await self.breaker.call(lambda: operation(self.client))
        except BackendUnavailable:
            if was_healthy:
                await self._forget_connections()
            raise

    async def execute(self, commands: Sequence[Command], lane: RedisLane | None = None,
                      raise_on_error: bool = True) -> list[Any]:
        """Commands in one round trip on a lane (default: the shared one), behind the
        breaker; raw replies in order. An error reply raises ``ResponseError`` after
        all of them have run, as a redis-py pipeline does, unless ``raise_on_error``
        is False: then it is left in the list."""
        was_healthy = self.breaker.healthy
        try:
            replies = await self.breaker.call(
                lambda: (lane or self.lane).execute(commands))
        except BackendUnavailable:
            if was_healthy:
                await self._forget_connections()
            raise
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
        return replies

    def blocking_lane(self, block_seconds: float) -> RedisLane:
        """A lane of its own for one consumer's blocking reads (``XREAD BLOCK``...)."""
        lane = RedisLane(self.url, self.timeout + block_seconds, blocking=True)
        self._lanes.append(lane)
        return lane

    async def _forget_connections(self) -> None:
        # Redis just went away. Idle pooled connections still point at the old
        # server; left alone, each would fail once after Redis is back and reopen
        # the breaker, so REST would flap between 200 and 503 for seconds.
        self.lane.reset()
        with contextlib.suppress(Exception):
            await self.client.connection_pool.disconnect(inuse_connections=False)

    async def ping(self) -> dict[str, Any]:
        started = time.monotonic()
        await asyncio.wait_for(self.client.ping(), timeout=1.5)
        return {"status": "up", "latency_ms": round((time.monotonic() - started) * 1000, 2)}

    async def close(self) -> None:
        for lane in (self.lane, *self._lanes):
            await lane.close()
        await self.client.aclose()
        await self.blocking.aclose()
