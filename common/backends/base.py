"""The interfaces the gateway and router are written against.

Each backend kind is one ``typing.Protocol``; the embedded node implements
them in-process (memory and SQLite), the cluster on Redis and Postgres, and
the gateway and router code is the same in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from common.protocol import Notification, Target


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One live connection as the cluster sees it."""

    connection_id: str
    tenant_id: str
    user_id: str
    node_id: str
    transport: Literal["websocket", "sse"]
    connected_at: float
    channels: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        from common.protocol import utc_iso

        return {
            "connection_id": self.connection_id,
            "node_id": self.node_id,
            "transport": self.transport,
            "connected_at": utc_iso(self.connected_at),
            "channels": sorted(self.channels),
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a router asks one gateway to write to its local sockets."""

    kind: Literal["users", "channels", "broadcast"]
    notification: Notification
    user_ids: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()


@dataclass(slots=True)
class UserOutcome:
    connections: int = 0
    queued: bool = False


@dataclass(slots=True)
class RouteReport:
    """What routing one notification did, in the shape REST answers need."""

    delivered_to: int = 0
    users: dict[str, UserOutcome] = field(default_factory=dict)
    channels: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    error: str | None = None
    # The router records this notification's receipt (with its mailbox rows, before
    # it delivers); the accepting side then writes none (``Sender.send``).
    receipt_by_router: bool = False

    @property
    def queued(self) -> bool:
        return any(u.queued for u in self.users.values())

    @property
    def success(self) -> bool:
        if self.error:
            return False
        if self.users:
            return all(u.connections > 0 or u.queued for u in self.users.values())
        return True


@dataclass(frozen=True, slots=True)
class MailboxEntry:
    notification: Notification
    delivered: bool


@dataclass(frozen=True, slots=True)
class MailboxPut:
    user_id: str
    notification: Notification
    delivered: bool


# A receipt to record: the notification, its whole target, and how many live
# connections it was routed to.
ReceiptRow = tuple[Notification, Target, int]


class SessionStore(Protocol):
    """Cluster-wide view of who is connected where."""

    async def register(self, session: SessionInfo) -> None: ...

    async def unregister(self, session: SessionInfo) -> None:
        """Forget a connection, and its part in the channels it was subscribed to."""
        ...

    async def update_channels(
        self, session: SessionInfo, added: Sequence[str], removed: Sequence[str]
    ) -> None: ...

    async def sessions_of(
        self, tenant_id: str, user_ids: Sequence[str]
    ) -> dict[str, list[SessionInfo]]: ...

    async def channel_nodes(
        self, tenant_id: str, channels: Sequence[str]
    ) -> dict[str, dict[str, int]]: ...

    async def channel_counts(self, tenant_id: str | None) -> dict[tuple[str, str], int]: ...

    async def tenant_connections(self, tenant_id: str) -> int: ...

    async def tenant_summary(self, tenant_id: str | None) -> dict[str, int]:
        """``websocket``, ``sse`` and ``users`` counts, cluster-wide."""
        ...

    async def live_nodes(self) -> list[str]: ...

    async def tenants(self) -> list[str]:
        """Tenants that have live connections."""
        ...


class NodeDelivery(Protocol):
    """Hands a delivery to the gateway that holds the sockets."""

    async def deliver(self, node_id: str, delivery: Delivery) -> None: ...


class Mailbox(Protocol):
    """Per-user offline queue and at-least-once mailbox, bounded and expiring."""

    async def put(
        self, items: Sequence[MailboxPut], receipts: Sequence[ReceiptRow] = ()
    ) -> None:
        """Store ``items`` in order; ``receipts`` are recorded in the same write.

        A router routes a batch with one durable write before it delivers: the
        batch's mailbox rows and the receipts it records (a mailbox and the
        receipts share one database in every backend).
        """
        ...

    async def pending(self, tenant_id: str, user_id: str) -> list[MailboxEntry]: ...

    async def mark_delivered(
        self, tenant_id: str, pairs: Sequence[tuple[str, str]]
    ) -> None:
        """Flag (user id, notification id) pairs as sent at least once."""
        ...

    async def remove(self, tenant_id: str, user_id: str, ids: Sequence[str]) -> None: ...

    async def ack(self, tenant_id: str, user_id: str, notification_id: str) -> bool: ...

    async def purge_expired(self, now: float) -> int: ...

    async def depth(self, tenant_id: str | None = None) -> int: ...


AckResult = Literal["acked", "duplicate", "unknown", "not_yours"]


@dataclass(frozen=True, slots=True)
class Receipt:
    notification_id: str
    tenant_id: str
    target: Target
    event_type: str
    created_at: float
    expires_at: float
    delivered_to: int
    acked_by: tuple[tuple[str, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class AckStats:
    pending: int
    acknowledged: int
    expired: int
    average_ack_time_ms: float


class ReceiptStore(Protocol):
    """Who a notification went to and who acknowledged it."""

    async def record(
        self, notification: Notification, target: Target, delivered_to: int
    ) -> None: ...

    async def set_delivered(self, counts: Sequence[tuple[str, int]]) -> None:
        """Correct recorded receipts' ``delivered_to`` ((notification id, count) pairs)."""
        ...

    async def ack(
        self, tenant_id: str, notification_id: str, user_id: str, connection_id: str, now: float
    ) -> AckResult: ...

    async def get(self, tenant_id: str, notification_id: str) -> Receipt | None: ...

    async def stats(self, tenant_id: str | None, now: float, ack_timeout: float) -> AckStats: ...

    async def purge(self, before: float) -> int:
        """Delete the receipts of notifications that expired before ``before``, with their
        recipient and ACK rows; returns how many receipts were deleted.

        Every notification leaves a receipt, so without this they pile up for good (86M
        a day at 1000 notifications/s) and the ``stats`` query reads all of them. The
        caller passes ``now - RECEIPT_RETENTION_SECONDS``: a receipt outlives the time its
        notification can be delivered or ACKed by at least that much. Implementations
        delete in bounded batches, each its own transaction, so a large purge neither
        holds one huge transaction nor stalls the writers.
        """
        ...


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    tenant_id: str
    name: str | None
    event_type: str
    payload_template: Any
    default_priority: str
    default_ttl: int | None
    description: str | None
    created_at: float
    updated_at: float

    def public(self) -> dict[str, Any]:
        from common.protocol import utc_iso

        return {
            "id": self.id,
            "name": self.name,
            "event_type": self.event_type,
            "payload_template": self.payload_template,
            "default_priority": self.default_priority,
            "default_ttl": self.default_ttl,
            "description": self.description,
            "created_at": utc_iso(self.created_at),
            "updated_at": utc_iso(self.updated_at),
        }


def encode_template(t: Template) -> str:
    """A template's stored body (everything but its key), shared by the stores."""
    from common import jsoncodec

    return jsoncodec.dumps_str(
        {
            "name": t.name,
            "event_type": t.event_type,
            "payload_template": t.payload_template,
            "default_priority": t.default_priority,
            "default_ttl": t.default_ttl,
            "description": t.description,
            "created_at": t.created_at,
            "updated_at": t.updated_at,
        }
    )


def decode_template(tenant_id: str, template_id: str, body: str) -> Template:
    from common import jsoncodec

    return Template(id=template_id, tenant_id=tenant_id, **jsoncodec.loads(body))


class TemplateStore(Protocol):
    """Templates, shared by every gateway of the deployment."""

    async def create(self, template: Template) -> bool: ...

    async def replace(self, template: Template) -> bool: ...

    async def get(self, tenant_id: str, template_id: str) -> Template | None: ...

    async def list(self, tenant_id: str) -> list[Template]: ...

    async def delete(self, tenant_id: str, template_id: str) -> bool: ...


class Dispatcher(Protocol):
    """Accepts a stamped notification for routing and says what happened."""

    async def dispatch(self, notification: Notification, target: Target) -> RouteReport: ...
