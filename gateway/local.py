"""Embedded-mode backends that are views over this process's ConnectionManager.

With one node the cluster's session store and node streams collapse into
the local indexes, so nothing is copied: the router reads the same
dictionaries the sockets live in.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.backends.base import Delivery, SessionInfo
from common.telemetry import span, tracing_enabled
from gateway.connection import Connection
from gateway.connections import ConnectionManager


def session_of(conn: Connection, node_id: str) -> SessionInfo:
    return SessionInfo(
        connection_id=conn.id,
        tenant_id=conn.tenant_id,
        user_id=conn.user_id,
        node_id=node_id,
        transport=conn.transport,
        connected_at=conn.connected_at,
        channels=tuple(conn.channels),
    )


class LocalSessionStore:
    """``SessionStore`` answered from the local connection indexes."""

    def __init__(self, manager: ConnectionManager, node_id: str) -> None:
        self.manager = manager
        self.node_id = node_id

    async def register(self, session: SessionInfo) -> None:
        return None

    async def unregister(self, session: SessionInfo) -> None:
        return None

    async def update_channels(
        self, session: SessionInfo, added: Sequence[str], removed: Sequence[str]
    ) -> None:
        return None

    async def sessions_of(
        self, tenant_id: str, user_ids: Sequence[str]
    ) -> dict[str, list[SessionInfo]]:
        result: dict[str, list[SessionInfo]] = {}
        for user_id in user_ids:
            conns = self.manager.user_connections(tenant_id, user_id)
            result[user_id] = [session_of(c, self.node_id) for c in conns if not c.closed]
        return result

    async def channel_nodes(
        self, tenant_id: str, channels: Sequence[str]
    ) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for channel in channels:
            count = self.manager.channel_count(tenant_id, channel)
            result[channel] = {self.node_id: count} if count else {}
        return result

    async def channel_counts(self, tenant_id: str | None) -> dict[tuple[str, str], int]:
        return {
            key: len(conns)
            for key, conns in self.manager.by_channel.items()
            if tenant_id is None or key[0] == tenant_id
        }

    async def tenant_connections(self, tenant_id: str) -> int:
        return self.manager.tenant_count(tenant_id)

    async def tenant_summary(self, tenant_id: str | None) -> dict[str, int]:
        conns = [
            c for c in self.manager.by_id.values() if tenant_id is None or c.tenant_id == tenant_id
        ]
        return {
            "websocket": sum(1 for c in conns if c.transport == "websocket"),
            "sse": sum(1 for c in conns if c.transport == "sse"),
            "users": len({(c.tenant_id, c.user_id) for c in conns}),
        }

    async def live_nodes(self) -> list[str]:
        return [self.node_id]

    async def tenants(self) -> list[str]:
        return list(self.manager.by_tenant)


class LocalDelivery:
    """``NodeDelivery`` for the embedded node: straight into the local sockets."""

    def __init__(self, manager: ConnectionManager) -> None:
        self.manager = manager

    async def deliver(self, node_id: str, delivery: Delivery) -> None:
        deliver_traced(self.manager, delivery)


def deliver_traced(manager: ConnectionManager, delivery: Delivery) -> int:
    """Write a delivery to local sockets, as an ``ara.deliver`` span when tracing."""
    if not tracing_enabled():
        return manager.deliver(delivery)
    n = delivery.notification
    with span("ara.deliver", parent=n.trace, attributes={
        "ara.notification_id": n.id, "ara.kind": delivery.kind,
    }) as current:
        reached = manager.deliver(delivery)
        if current is not None:
            current.set_attribute("ara.connections", reached)
        return reached
