"""Wiring of a cluster gateway: Redis sessions and streams, Postgres stores.

The gateway validates and stamps a notification, appends it to its
partition stream and answers from a read of the session store; a router
does the routing. The gateway also consumes its own delivery stream and
writes what arrives to its local sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from common.backends.base import SessionInfo
from common.backends.postgres import (
    PostgresHandle,
    PostgresMailbox,
    PostgresReceipts,
    PostgresTemplates,
)
from common.backends.redis_client import RedisHandle
from common.backends.redis_dispatch import ClusterDispatcher
from common.backends.redis_lane import stream_entries
from common.backends.redis_limits import RedisIdempotencyStore, RedisRateLimiter
from common.backends.redis_receipts import ClusterReceipts
from common.backends.redis_sessions import LocalView, RedisSessionStore
from common.backends.redis_stats import RedisStats
from common.backends.redis_streams import PartitionProducer, decode_delivery
from common.metrics import Metrics
from common.settings import Settings
from gateway.connections import ConnectionManager
from gateway.local import deliver_traced, session_of
from gateway.node import Backends

log = logging.getLogger("ara.gateway.cluster")

HEARTBEAT_SECONDS = 2.0
READ_BLOCK_MS = 1000
TTL_REFRESH_SECONDS = 60.0


class GatewayLoops:
    """Heartbeat/re-registration and the delivery-stream consumer of one gateway."""

    def __init__(
        self,
        settings: Settings,
        handle: RedisHandle,
        sessions: RedisSessionStore,
        manager: ConnectionManager,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.redis = handle
        self.sessions = sessions
        self.manager = manager
        self.metrics = metrics
        self.node_id = settings.node_id
        self.stream = handle.keys.node_stream(settings.node_id)
        self.reads = handle.blocking_lane(READ_BLOCK_MS / 1000)
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat()), loop.create_task(self._consume())]

    async def stop(self) -> None:
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sessions.leave(), timeout=2)

    def info(self) -> dict[str, Any]:
        return {
            "connections": len(self.manager),
            "started_at": self.started_at,
            "role": "gateway",
        }

    async def _heartbeat(self) -> None:
        last_refresh = time.monotonic()
        while not self.stopping:
            try:
                refresh = time.monotonic() - last_refresh > TTL_REFRESH_SECONDS
                rewrote = await self.sessions.heartbeat(self.info(), refresh_ttls=refresh)
                if refresh:
                    last_refresh = time.monotonic()
                if rewrote:
                    log.warning("registered %d sessions in Redis again", len(self.manager))
                self.metrics.backend_up.labels("redis").set(1)
            except Exception as exc:
                self.metrics.backend_up.labels("redis").set(0)
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _consume(self) -> None:
        last = await self._start_id()
        backoff = 0.1
        trimmed = 0
        while not self.stopping:
            try:
                (reply,) = await self.redis.execute(
                    [("XREAD", "COUNT", 1000, "BLOCK", READ_BLOCK_MS, "STREAMS", self.stream,
                      last)], lane=self.reads)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading delivery stream failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            for _, entries in stream_entries(reply):
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        delivery = decode_delivery(fields[b"d"])  # type: ignore[index]
                    except Exception:
                        log.exception("dropping undecodable delivery %r", entry_id)
                        continue
                    reached = deliver_traced(self.manager, delivery)
                    self.metrics.child(self.metrics.deliveries, delivery.kind).inc(reached)
                trimmed += len(entries)
            if trimmed >= 1000:
                trimmed = 0
                with contextlib.suppress(Exception):
                    await self.redis.client.xtrim(self.stream, minid=last, approximate=True)

    async def _start_id(self) -> bytes | str:
        while True:
            try:
                newest: Any = await self.redis.client.xrevrange(self.stream, count=1)
                return bytes(newest[0][0]) if newest else "0-0"
            except Exception as exc:
                log.warning("delivery stream not reachable yet: %s", exc)
                await asyncio.sleep(0.5)


def _local_view(manager: ConnectionManager, node_id: str) -> LocalView:
    def sessions() -> list[SessionInfo]:
        return [session_of(c, node_id) for c in manager.by_id.values() if not c.closed]

    def tenant_counts(tenant: str) -> dict[str, int]:
        conns = manager.by_tenant.get(tenant, {}).values()
        return {
            "websocket": sum(1 for c in conns if c.transport == "websocket"),
            "sse": sum(1 for c in conns if c.transport == "sse"),
            "users": len({c.user_id for c in conns}),
        }

    return LocalView(
        sessions=sessions,
        tenant_counts=tenant_counts,
        channel_count=manager.channel_count,
        channels=lambda: list(manager.by_channel),
    )


def cluster_backends(settings: Settings, manager: ConnectionManager, metrics: Metrics) -> Backends:
    if not settings.redis_url or not settings.database_url:
        raise ValueError("a cluster gateway needs REDIS_URL and DATABASE_URL")
    handle = RedisHandle(settings.redis_url, settings.redis_key_prefix)
    handle.breaker.on_change = lambda up: metrics.backend_up.labels("redis").set(1 if up else 0)
    pg = PostgresHandle(settings.database_url, min_size=0, max_size=10)
    sessions = RedisSessionStore(handle, settings.node_id, _local_view(manager, settings.node_id))
    loops = GatewayLoops(settings, handle, sessions, manager, metrics)
    stats = RedisStats(handle)

    async def cluster_view() -> dict[str, object]:
        return await cluster_status(settings, handle, sessions)

    return Backends(
        sessions=sessions,
        mailbox=PostgresMailbox(pg, settings.queue_max_size_per_user),
        receipts=ClusterReceipts(PostgresReceipts(pg), handle, settings.router_partitions),
        templates=PostgresTemplates(pg),
        dispatcher=ClusterDispatcher(settings, sessions, PartitionProducer(handle)),
        starters=[pg.open, loops.start, stats.start],
        stoppers=[handle.close, pg.close, loops.stop, stats.stop],
        health={"redis": handle.ping, "postgres": pg.ping},
        rate_limiter=RedisRateLimiter(handle),
        idempotency=RedisIdempotencyStore(handle),
        stats=stats,
        cluster=cluster_view,
        available=lambda: handle.breaker.healthy,
    )


async def cluster_status(
    settings: Settings, handle: RedisHandle, sessions: RedisSessionStore
) -> dict[str, object]:
    from common.backends.redis_sessions import NODE_TTL
    from common.jsoncodec import loads

    nodes = await sessions.node_infos()

    async def routers_op(r: Any) -> Any:
        async with r.pipeline(transaction=False) as pipe:
            pipe.zrange(handle.keys.routers, 0, -1, withscores=True)
            pipe.hgetall(handle.keys.router_info)
            return await pipe.execute()

    members, infos = await handle.run(routers_op)
    now = time.time()
    routers = []
    for member, score in members:
        name = member.decode()
        info = infos.get(member)
        data = loads(info) if info else {}
        data["router_id"] = name
        data["status"] = "healthy" if now - float(score) < NODE_TTL else "dead"
        routers.append(data)
    healthy = [n for n in nodes.values() if n["status"] == "healthy"]
    return {
        "node_id": settings.node_id,
        "nodes": list(nodes.values()),
        "healthy_nodes": len(healthy),
        "routers": routers,
        "partitions": settings.router_partitions,
        "total_connections": sum(int(n.get("connections", 0)) for n in healthy),
        "mode": "cluster",
    }
