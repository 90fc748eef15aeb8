"""``Dispatcher`` of a cluster gateway: append to partition streams, preview the outcome.

The REST answer (``delivered_to``, ``queued``) comes from a read of the
session store at accept time; the routing itself is done by the router
that owns the partition, in stream order.
"""

from __future__ import annotations

from collections import defaultdict

from common.backends.base import RouteReport, UserOutcome
from common.backends.redis_sessions import RedisSessionStore
from common.backends.redis_streams import PartitionProducer, encode_accepted
from common.protocol import Notification, Target
from common.ring import BROADCAST_KEY, partition_of
from common.settings import Settings


def split_by_partition(
    notification: Notification, target: Target, partitions: int
) -> list[tuple[int, Target]]:
    """One stream entry per partition the target touches; user order is kept."""
    tenant = notification.tenant_id
    if target.kind in ("user", "users"):
        groups: dict[int, list[str]] = defaultdict(list)
        for user_id in dict.fromkeys(target.user_ids):
            groups[partition_of(tenant, user_id, partitions)].append(user_id)
        if target.kind == "user":
            return [(p, target) for p in groups]
        return [(p, Target("users", user_ids=tuple(users))) for p, users in groups.items()]
    if target.kind in ("channel", "channels"):
        return [(partition_of(tenant, "#" + target.channels[0], partitions), target)]
    return [(partition_of(tenant, BROADCAST_KEY, partitions), target)]


class ClusterDispatcher:
    """``Dispatcher`` that appends to partition streams and previews the outcome."""

    def __init__(
        self, settings: Settings, sessions: RedisSessionStore, producer: PartitionProducer
    ) -> None:
        self.partitions = settings.router_partitions
        self.queue_enabled = settings.queue_enabled
        self.sessions = sessions
        self.producer = producer

    async def dispatch(self, notification: Notification, target: Target) -> RouteReport:
        report = await self.preview(notification, target)
        entries = [
            (partition, encode_accepted(notification, part))
            for partition, part in split_by_partition(notification, target, self.partitions)
        ]
        await self.producer.append(entries)
        return report

    async def preview(self, n: Notification, target: Target) -> RouteReport:
        report = RouteReport()
        if target.kind in ("user", "users"):
            users = list(dict.fromkeys(target.user_ids))
            found = await self.sessions.sessions_of(n.tenant_id, users)
            for user_id in users:
                count = len(found.get(user_id, []))
                report.users[user_id] = UserOutcome(count, self.queue_enabled and count == 0)
                report.delivered_to += count
        elif target.kind in ("channel", "channels"):
            channels = list(dict.fromkeys(target.channels))
            placement = await self.sessions.channel_nodes(n.tenant_id, channels)
            for channel in channels:
                report.channels[channel] = sum(placement.get(channel, {}).values())
                report.delivered_to += report.channels[channel]
        else:
            report.delivered_to = await self.sessions.tenant_connections(n.tenant_id)
        return report
