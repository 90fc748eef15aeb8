"""GatewayNode: the life of client connections on this process.

It admits connections (limits), registers them with the session store,
replays the user's mailbox before live traffic, handles subscriptions and
ACKs, runs heartbeats and idle/expiry checks, and drains on shutdown. The
same object serves the embedded node and a cluster gateway; only the
backends it is given differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from common import jsoncodec
from common.auth import Identity
from common.backends.base import (
    Dispatcher,
    Mailbox,
    ReceiptStore,
    SessionStore,
    TemplateStore,
)
from common.errors import BackendUnavailable
from common.idempotency import IdempotencyStore, MemoryIdempotencyStore
from common.metrics import Metrics
from common.protocol import (
    HEARTBEAT_FRAME,
    error_frame,
    shutdown_frame,
    utc_iso,
    valid_channel,
)
from common.ratelimit import LocalLimiter, RateLimiter
from common.settings import Settings
from common.stats import MemoryStats, StatsStore
from gateway.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_EXPIRED,
    Connection,
    Sink,
    Transport,
)
from gateway.connections import ConnectionManager
from gateway.local import session_of

log = logging.getLogger("ara.gateway")

PURGE_PERIOD = 60  # seconds between two rounds of ``GatewayNode.purge``


class ConnectionRefused(Exception):
    """A connection over a limit; ``code`` is the error code sent first."""

    def __init__(self, code: str, message: str, http_status: int = 429) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclass
class Backends:
    """Everything a gateway needs from outside its process."""

    sessions: SessionStore
    mailbox: Mailbox
    receipts: ReceiptStore
    templates: TemplateStore
    dispatcher: Dispatcher
    starters: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    stoppers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    health: dict[str, Callable[[], Awaitable[dict[str, object]]]] = field(default_factory=dict)
    rate_limiter: RateLimiter = field(default_factory=LocalLimiter)
    idempotency: IdempotencyStore = field(default_factory=MemoryIdempotencyStore)
    stats: StatsStore = field(default_factory=MemoryStats)
    cluster: Callable[[], Awaitable[dict[str, object]]] | None = None
    available: Callable[[], bool] = lambda: True
    # Whether this node keeps the stores tidy: every ``PURGE_PERIOD`` it deletes expired
    # mailbox rows and receipts past their retention and sets ``ara_queue_depth``. The
    # embedded node does. In a cluster the router holding partition 0 does it once for
    # the whole cluster (``router/cluster.py``): from every gateway it was the same
    # deletes racing each other and a full scan of the mailbox per gateway per minute.
    janitor: bool = False


class GatewayNode:
    """Owns this node's connections and the rules every connection follows."""

    def __init__(
        self,
        settings: Settings,
        manager: ConnectionManager,
        backends: Backends,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.manager = manager
        self.backends = backends
        self.metrics = metrics
        self.started_at = time.time()
        self.ready = False
        self.draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._last_beat = time.monotonic()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        for start in self.backends.starters:
            await start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._heartbeat_loop()))
        if self.backends.janitor:
            self._tasks.append(loop.create_task(self._purge_loop()))
        self.ready = True
        log.info("node %s ready", self.node_id)

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for conn in list(self.manager):
            conn.abort(CLOSE_GOING_AWAY, "server stopping")
            await self.end(conn)
        for stop in reversed(self.backends.stoppers):
            with contextlib.suppress(Exception):
                await stop()

    async def drain(self, reason: str = "server shutting down") -> None:
        """Stop taking traffic, tell every client when to come back, close 1001."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        conns = list(self.manager)
        spread = max(1, int(self.settings.drain_timeout_seconds))
        log.info("draining %d connections", len(conns))
        closing = []
        for conn in conns:
            after = random.randint(1, spread)
            frame = shutdown_frame(reason, after)
            conn.push(("shutdown", None, frame))
            closing.append(conn.close_after_flush(CLOSE_GOING_AWAY, "server shutdown"))
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        for conn in conns:
            await self.end(conn)

    # -- connections -------------------------------------------------------

    async def admit(self, identity: Identity, transport: Transport, sink: Sink) -> Connection:
        """Check limits and create the connection (not yet registered)."""
        s = self.settings
        if self.draining:
            raise ConnectionRefused("SERVICE_UNAVAILABLE", "server is draining", 503)
        if len(self.manager) >= s.websocket_max_connections:
            self.metrics.connections_rejected.labels("total").inc()
            raise ConnectionRefused("CONNECTION_LIMIT", "server connection limit reached")
        if s.websocket_max_connections_per_tenant:
            count = await self.backends.sessions.tenant_connections(identity.tenant_id)
            if count >= s.websocket_max_connections_per_tenant:
                self.metrics.connections_rejected.labels("tenant").inc()
                raise ConnectionRefused("CONNECTION_LIMIT", "tenant connection limit reached")
        sessions = await self.backends.sessions.sessions_of(identity.tenant_id, [identity.user_id])
        if len(sessions.get(identity.user_id, [])) >= s.websocket_max_connections_per_user:
            self.metrics.connections_rejected.labels("user").inc()
            raise ConnectionRefused("CONNECTION_LIMIT", "per-user connection limit reached")
        conn = Connection(str(uuid.uuid4()), identity, transport, sink, s.websocket_send_queue_size)
        return conn

    async def begin(self, conn: Connection, channels: Sequence[str] = ()) -> None:
        """Register, greet, subscribe, replay the mailbox, then open live traffic."""
        self.manager.add(conn)
        self.metrics.connections.labels(conn.transport).inc()
        self.metrics.connections_total.labels(conn.transport).inc()
        loop = asyncio.get_running_loop()
        remaining = conn.identity.expires_at - time.time()
        conn.expiry_timer = loop.call_later(max(0.0, remaining), self._expire, conn)
        for name in channels:
            self.manager.subscribe(conn, name)
        try:
            await self.backends.sessions.register(session_of(conn, self.node_id))
            if channels:
                await self.backends.sessions.update_channels(
                    session_of(conn, self.node_id), list(conn.channels), []
                )
        except BackendUnavailable:
            # The socket keeps working locally; the next heartbeat registers it.
            log.warning("session %s not registered yet: session store unavailable", conn.id)
        # Greeted once registered: a client that has its ``connected`` frame counts
        # against the cluster-wide limits and is found by the routers' lookups. Live
        # traffic is held until the replay is done, so nothing can come before it.
        conn.push(
            (
                "connected",
                None,
                jsoncodec.dumps_str(
                    {
                        "type": "connected",
                        "connection_id": conn.id,
                        "user_id": conn.user_id,
                        "server_id": self.node_id,
                    }
                ),
            )
        )
        await self._replay(conn)

    async def _replay(self, conn: Connection) -> None:
        replayed: list[str] = []
        try:
            if self.settings.queue_enabled:
                await self._replay_into(conn, replayed)
        except BackendUnavailable:
            log.warning("mailbox unavailable; %s replays on its next connect", conn.id)
        finally:
            conn.finish_replay(replayed)

    async def _replay_into(self, conn: Connection, replayed: list[str]) -> None:
        entries = await self.backends.mailbox.pending(conn.tenant_id, conn.user_id)
        for entry in entries:
            if conn.closed:
                break
            n = entry.notification
            await self._wait_writable(conn)
            conn.push(("notification", n.id, n.frame(redelivered=entry.delivered)))
            replayed.append(n.id)
        if not replayed:
            return
        self.metrics.replayed.inc(len(replayed))
        if self.settings.at_least_once:
            fresh = [(conn.user_id, e.notification.id) for e in entries if not e.delivered]
            await self.backends.mailbox.mark_delivered(conn.tenant_id, fresh)
        else:
            await self.backends.mailbox.remove(conn.tenant_id, conn.user_id, replayed)

    async def _wait_writable(self, conn: Connection) -> None:
        """Backpressure for long replays: never overflow our own outbox."""
        high = max(1, conn.max_outbox // 2)
        # Polling, not an Event per connection: replays are rare, sockets are many.
        while len(conn.outbox) >= high and not conn.closed:  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    async def end(self, conn: Connection) -> None:
        """Forget a closed connection everywhere."""
        if not self.manager.remove(conn):
            return
        if conn.expiry_timer is not None:
            conn.expiry_timer.cancel()
        self.metrics.connections.labels(conn.transport).dec()
        if conn.close_code == CLOSE_SLOW_CONSUMER:
            self.metrics.slow_consumers.inc()
        try:
            await self.backends.sessions.unregister(session_of(conn, self.node_id))
        except Exception:
            log.warning("could not unregister %s; its session will expire", conn.id)

    def _expire(self, conn: Connection) -> None:
        if not conn.closed:
            conn.push(("error", None, error_frame("TOKEN_EXPIRED", "token expired")))
            asyncio.get_running_loop().create_task(
                conn.close_after_flush(CLOSE_TOKEN_EXPIRED, "token expired", within=1.0)
            )

    # -- client requests -------------------------------------------------------

    async def subscribe(
        self, conn: Connection, names: Sequence[object]
    ) -> tuple[list[str], str | None]:
        limit = self.settings.websocket_max_subscriptions_per_connection
        accepted: list[str] = []
        added: list[str] = []
        problems: list[str] = []
        for name in names:
            if not valid_channel(name):
                problems.append(f"invalid channel name {jsoncodec.preview(name)!r}")
                continue
            assert isinstance(name, str)
            if name not in conn.channels and len(conn.channels) >= limit:
                problems.append(f"subscription limit of {limit} reached; {name!r} not subscribed")
                continue
            if self.manager.subscribe(conn, name):
                added.append(name)
            accepted.append(name)
        if added:
            await self.backends.sessions.update_channels(session_of(conn, self.node_id), added, [])
        return accepted, "; ".join(problems) or None

    async def unsubscribe(
        self, conn: Connection, names: Sequence[object]
    ) -> tuple[list[str], str | None]:
        removed: list[str] = []
        done: list[str] = []
        problems: list[str] = []
        for name in names:
            if not valid_channel(name):
                problems.append(f"invalid channel name {jsoncodec.preview(name)!r}")
                continue
            assert isinstance(name, str)
            if self.manager.unsubscribe(conn, name):
                removed.append(name)
            done.append(name)
        if removed:
            session = session_of(conn, self.node_id)
            await self.backends.sessions.update_channels(session, [], removed)
        return done, "; ".join(problems) or None

    async def ack(self, identity: Identity, connection_id: str, notification_id: str) -> str | None:
        """Record an ACK; returns an error message, or None when accepted."""
        if not self.settings.ack_enabled:
            return "acknowledgements are disabled on this server"
        now = time.time()
        result = await self.backends.receipts.ack(
            identity.tenant_id, notification_id, identity.user_id, connection_id, now
        )
        self.metrics.acks.labels(result).inc()
        if result == "unknown":
            return "unknown notification id"
        if result == "not_yours":
            return "notification was not sent to this user"
        await self.backends.mailbox.ack(identity.tenant_id, identity.user_id, notification_id)
        if result == "acked":
            receipt = await self.backends.receipts.get(identity.tenant_id, notification_id)
            if receipt is not None:
                self.metrics.ack_latency.observe(max(0.0, now - receipt.created_at))
        return None

    # -- views -----------------------------------------------------------------

    async def stats(self, tenant_id: str) -> dict[str, object]:
        summary = await self.backends.sessions.tenant_summary(tenant_id)
        channels = await self.backends.sessions.channel_counts(tenant_id)
        totals = await self.backends.stats.totals(tenant_id)
        acks = await self.backends.receipts.stats(
            tenant_id, time.time(), self.settings.ack_timeout_seconds
        )
        return {
            "connections": {
                "total": summary["websocket"] + summary["sse"],
                "websocket": summary["websocket"],
                "sse": summary["sse"],
            },
            "users": summary["users"],
            "channels": sum(1 for count in channels.values() if count > 0),
            "notifications": totals,
            "acks": {
                "pending": acks.pending,
                "acknowledged": acks.acknowledged,
                "expired": acks.expired,
                "average_ack_time_ms": acks.average_ack_time_ms,
            },
            "node_id": self.node_id,
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }

    async def tenant_usage(self, tenant_id: str) -> dict[str, object]:
        summary = await self.backends.sessions.tenant_summary(tenant_id)
        channels = await self.backends.sessions.channel_counts(tenant_id)
        return {
            "tenant_id": tenant_id,
            "connections": summary["websocket"] + summary["sse"],
            "users": summary["users"],
            "channels": sum(1 for count in channels.values() if count > 0),
            "messages": await self.backends.stats.totals(tenant_id),
        }

    async def known_tenants(self) -> list[str]:
        found = set(await self.backends.sessions.tenants())
        found.update(await self.backends.stats.tenants())
        return sorted(found)

    async def cluster_status(self) -> dict[str, object]:
        if self.backends.cluster is not None:
            return await self.backends.cluster()
        return {
            "node_id": self.node_id,
            "nodes": [{"node_id": self.node_id, "connections": len(self.manager),
                       "status": "healthy" if self.ready else "not_ready"}],
            "healthy_nodes": 1 if self.ready else 0,
            "routers": [{"router_id": self.node_id, "partitions": self.settings.router_partitions}],
            "partitions": self.settings.router_partitions,
            "total_connections": len(self.manager),
            "mode": "embedded",
        }

    async def health(self) -> dict[str, object]:
        degraded = False
        parts: dict[str, object] = {}
        for name in ("redis", "postgres"):
            probe = self.backends.health.get(name)
            if probe is None:
                parts[name] = {"status": "not_configured"}
                continue
            try:
                state = await asyncio.wait_for(probe(), timeout=2.0)
            except Exception as exc:
                state = {"status": "down", "error": type(exc).__name__}
            parts[name] = state
            if state.get("status") != "up":
                degraded = True
        from common import __version__

        by_transport = {"websocket": 0, "sse": 0}
        for conn in self.manager.by_id.values():
            by_transport[conn.transport] += 1
        return {
            "status": "degraded" if degraded or self.draining else "healthy",
            "version": __version__,
            "node_id": self.node_id,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            **parts,
            "connections": {"total": len(self.manager), **by_transport},
        }

    # -- background work -------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.websocket_heartbeat_interval
        timeout = self.settings.websocket_connection_timeout
        while True:
            await asyncio.sleep(min(interval, timeout / 4))
            now = time.monotonic()
            beat = now - self._last_beat >= interval
            if beat:
                self._last_beat = now
            stamp = utc_iso(time.time())
            sse_frame = jsoncodec.dumps_str({"type": "heartbeat", "timestamp": stamp})
            for conn in self.manager:
                if conn.closed:
                    continue
                if conn.transport == "websocket" and now - conn.last_seen > timeout:
                    log.info("closing idle connection %s", conn.id)
                    asyncio.get_running_loop().create_task(
                        conn.close_after_flush(CLOSE_IDLE, "idle timeout", within=1.0)
                    )
                    continue
                if beat:
                    frame = HEARTBEAT_FRAME if conn.transport == "websocket" else sse_frame
                    conn.push(("heartbeat", None, frame))

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_PERIOD)
            await self.purge(time.time())

    async def purge(self, now: float) -> None:
        """One round of the periodic purge (``Backends.janitor``): expired mailbox rows and
        the queue depth, then receipts whose notification expired more than
        ``RECEIPT_RETENTION_SECONDS`` ago.

        Each part that fails is logged and tried again next round; neither stops the other.
        """
        try:
            removed = await self.backends.mailbox.purge_expired(now)
            if removed:
                log.info("purged %d expired queued notifications", removed)
                self.metrics.purged.labels("mailbox").inc(removed)
            self.metrics.queue_depth.set(await self.backends.mailbox.depth())
        except Exception:
            log.warning("mailbox purge failed", exc_info=True)
        try:
            purged = await self.backends.receipts.purge(
                now - self.settings.receipt_retention_seconds)
        except Exception:
            log.warning("receipt purge failed; retried in %d s", PURGE_PERIOD, exc_info=True)
            return
        if purged:
            log.info("purged %d receipts past their retention", purged)
            self.metrics.purged.labels("receipts").inc(purged)
