"""Local ConnectionManager: this process's sockets and their indexes.

Indexes by connection, by user, by channel and by tenant make every
delivery a dictionary lookup; a delivery writes one shared encoded frame to
each matching connection's outbox and returns how many it reached.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from common.backends.base import Delivery
from gateway.connection import Connection

UserKey = tuple[str, str]
ChannelKey = tuple[str, str]


class ConnectionManager:
    """Holds the sockets of this node and fans deliveries out to them."""

    def __init__(self) -> None:
        self.by_id: dict[str, Connection] = {}
        self.by_user: dict[UserKey, dict[str, Connection]] = defaultdict(dict)
        self.by_channel: dict[ChannelKey, dict[str, Connection]] = defaultdict(dict)
        self.by_tenant: dict[str, dict[str, Connection]] = defaultdict(dict)
        self.delivered = 0

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.by_id.values()))

    def add(self, conn: Connection) -> None:
        self.by_id[conn.id] = conn
        self.by_user[(conn.tenant_id, conn.user_id)][conn.id] = conn
        self.by_tenant[conn.tenant_id][conn.id] = conn

    def remove(self, conn: Connection) -> bool:
        if self.by_id.pop(conn.id, None) is None:
            return False
        _discard(self.by_user, (conn.tenant_id, conn.user_id), conn.id)
        _discard(self.by_tenant, conn.tenant_id, conn.id)
        for channel in conn.channels:
            _discard(self.by_channel, (conn.tenant_id, channel), conn.id)
        return True

    def subscribe(self, conn: Connection, channel: str) -> bool:
        if channel in conn.channels:
            return False
        conn.channels.add(channel)
        self.by_channel[(conn.tenant_id, channel)][conn.id] = conn
        return True

    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        if channel not in conn.channels:
            return False
        conn.channels.discard(channel)
        _discard(self.by_channel, (conn.tenant_id, channel), conn.id)
        return True

    def user_connections(self, tenant_id: str, user_id: str) -> list[Connection]:
        found = self.by_user.get((tenant_id, user_id))
        return list(found.values()) if found else []

    def channel_count(self, tenant_id: str, channel: str) -> int:
        found = self.by_channel.get((tenant_id, channel))
        return len(found) if found else 0

    def tenant_count(self, tenant_id: str) -> int:
        found = self.by_tenant.get(tenant_id)
        return len(found) if found else 0

    def deliver(self, delivery: Delivery) -> int:
        """Write one delivery to the matching local sockets; returns how many."""
        n = delivery.notification
        if n.expired():
            return 0
        tenant = n.tenant_id
        reached = 0
        if delivery.kind == "users":
            item = ("notification", n.id, n.frame())
            for user_id in delivery.user_ids:
                found = self.by_user.get((tenant, user_id))
                if not found:
                    continue
                for conn in list(found.values()):
                    if conn.push_live(item, True):
                        reached += 1
        elif delivery.kind == "channels":
            seen: set[str] = set()
            for channel in delivery.channels:
                found = self.by_channel.get((tenant, channel))
                if not found:
                    continue
                item = ("notification", n.id, n.frame(channel=channel))
                for conn in list(found.values()):
                    if conn.id in seen:
                        continue
                    seen.add(conn.id)
                    if conn.push_live(item, False):
                        reached += 1
        else:
            found = self.by_tenant.get(tenant)
            if found:
                item = ("notification", n.id, n.frame())
                for conn in list(found.values()):
                    if conn.push_live(item, False):
                        reached += 1
        self.delivered += reached
        return reached


def _discard(index: dict[Any, dict[str, Connection]], key: object, conn_id: str) -> None:
    bucket = index.get(key)
    if bucket is None:
        return
    bucket.pop(conn_id, None)
    if not bucket:
        del index[key]
