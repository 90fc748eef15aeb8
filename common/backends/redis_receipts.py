"""Receipts of notifications a router has not routed yet, kept in Redis for a while.

In the cluster the router records a receipt, in the statement that writes its
batch's mailbox rows and before it delivers (``router/routing.py``), so the send
itself does no Postgres write. Between the send's answer and that statement a
``GET /api/v1/notifications/{id}`` on any gateway would find nothing; the send
therefore leaves a short-lived record in Redis, in the round trip that appends
the notification to its partition stream, and the router deletes it once the
receipt is in Postgres. Reads that find no row fall back to it: the receipt of a
notification that has reached nobody yet (``delivered_to`` 0, every target user
pending).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from common import jsoncodec
from common.backends.base import AckResult, AckStats, Receipt, ReceiptStore
from common.backends.redis_client import Keys, RedisHandle
from common.backends.redis_lane import Command
from common.protocol import Notification, Target

# Longest a pending record is kept when no router deletes it (routers down, or
# Postgres down while they retry): it is only the stop-gap until the row lands.
PENDING_RECEIPT_TTL_SECONDS = 600


def pending_receipt_command(
    keys: Keys, partition: int, n: Notification, target: Target
) -> Command:
    """The ``SET`` of a notification's pending receipt, for the send's round trip."""
    ttl = max(1, min(PENDING_RECEIPT_TTL_SECONDS, math.ceil(n.expires_at - time.time())))
    body = jsoncodec.dumps({"t": n.tenant_id, "g": target.to_dict(), "e": n.event_type,
                            "c": n.created_at, "x": n.expires_at})
    return ("SET", keys.pending_receipt(partition, n.id), body, "EX", ttl)


def forget_pending_commands(
    keys: Keys, recorded: Sequence[tuple[int, Sequence[str]]]
) -> list[Command]:
    """``DEL`` of pending receipts now recorded in Postgres: one command per partition
    ((partition, notification ids) pairs; a partition's keys share its slot)."""
    return [("DEL", *(keys.pending_receipt(p, nid) for nid in ids))
            for p, ids in recorded if ids]


class ClusterReceipts:
    """``ReceiptStore`` of a cluster gateway: Postgres, then the pending records.

    The id alone does not say which partition's slot holds a pending record, so a
    read that Postgres cannot answer asks every partition's, in one round trip.
    """

    def __init__(self, stored: ReceiptStore, handle: RedisHandle, partitions: int) -> None:
        self.stored = stored
        self.redis = handle
        self.partitions = partitions

    async def record(self, notification: Notification, target: Target, delivered_to: int) -> None:
        await self.stored.record(notification, target, delivered_to)

    async def set_delivered(self, counts: Sequence[tuple[str, int]]) -> None:
        await self.stored.set_delivered(counts)

    async def ack(
        self, tenant_id: str, notification_id: str, user_id: str, connection_id: str, now: float
    ) -> AckResult:
        return await self.stored.ack(tenant_id, notification_id, user_id, connection_id, now)

    async def get(self, tenant_id: str, notification_id: str) -> Receipt | None:
        receipt = await self.stored.get(tenant_id, notification_id)
        if receipt is not None:
            return receipt
        keys = self.redis.keys
        found = [raw for raw in await self.redis.execute(
            [("GET", keys.pending_receipt(p, notification_id)) for p in range(self.partitions)])
            if raw is not None]
        if not found:
            return None
        raw = found[0]
        data = jsoncodec.loads(raw)
        if data["t"] != tenant_id:
            return None
        # The row may have landed between the two reads (the router deletes the
        # record only after its statement committed).
        receipt = await self.stored.get(tenant_id, notification_id)
        if receipt is not None:
            return receipt
        return Receipt(
            notification_id=notification_id,
            tenant_id=tenant_id,
            target=Target.from_dict(data["g"]),
            event_type=data["e"],
            created_at=data["c"],
            expires_at=data["x"],
            delivered_to=0,
        )

    async def stats(self, tenant_id: str | None, now: float, ack_timeout: float) -> AckStats:
        return await self.stored.stats(tenant_id, now, ack_timeout)

    async def purge(self, before: float) -> int:
        """The stored receipts' purge. (Pending records expire in Redis on their own, by
        their notification's expiry at the latest.)"""
        return await self.stored.purge(before)
