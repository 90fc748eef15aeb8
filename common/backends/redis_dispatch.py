"""``Dispatcher`` of a cluster gateway: append to partition streams, preview the outcome.

The REST answer (``delivered_to``, ``queued``) comes from a read of the
session store at accept time; the routing itself is done by the router
that owns the partition, in stream order.
"""

from __future__ import annotations

from collections import defaultdict

from common.backends.base import RouteReport, UserOutcome
from common.backends.redis_lane import pairs_to_dict
from common.backends.redis_receipts import pending_receipt_command
from common.backends.redis_sessions import (
    RedisSessionStore,
    parse_channel_nodes,
    parse_live,
    parse_sessions,
    parse_tenant_counts,
)
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
    """``Dispatcher`` that appends to partition streams and previews the outcome.

    The reads for the answer and the appends go out in one pipeline: one round
    trip per send. The reads come first in it, so the answer describes the
    sessions as they were when the event was accepted, as before.
    """

    def __init__(
        self, settings: Settings, sessions: RedisSessionStore, producer: PartitionProducer
    ) -> None:
        self.partitions = settings.router_partitions
        self.queue_enabled = settings.queue_enabled
        self.sessions = sessions
        self.producer = producer

    async def dispatch(self, notification: Notification, target: Target) -> RouteReport:
        n = notification
        keys = self.sessions.keys
        parts = split_by_partition(n, target, self.partitions)
        # One entry: its router sees the whole notification and records the receipt
        # (with the batch's mailbox rows, before delivering). Split over several, no
        # router does, and the sender records it (``Sender.send``).
        by_router = len(parts) == 1
        entries = [(partition, encode_accepted(n, part, by_router)) for partition, part in parts]
        if target.kind in ("user", "users"):
            names = list(dict.fromkeys(target.user_ids))
            reads = [keys.session(n.tenant_id, u) for u in names]
        elif target.kind in ("channel", "channels"):
            names = list(dict.fromkeys(target.channels))
            reads = [keys.channel(n.tenant_id, c) for c in names]
        else:
            names = []
            reads = [keys.tenant_conns(n.tenant_id)]

        commands = [self.sessions.live_read_command(), *(("HGETALL", key) for key in reads)]
        if by_router:
            commands.append(pending_receipt_command(keys, parts[0][0], n, target))
        commands += self.producer.commands(entries)
        members, *replies = (await self.sessions.redis.execute(commands))[:len(reads) + 1]
        rows = [pairs_to_dict(reply) for reply in replies]
        report = self._report(n, target, names, rows, parse_live(members))
        report.receipt_by_router = by_router
        return report

    def _report(
        self, n: Notification, target: Target, names: list[str],
        rows: list[dict[bytes, bytes]], live: set[str],
    ) -> RouteReport:
        report = RouteReport()
        if target.kind in ("user", "users"):
            found = parse_sessions(n.tenant_id, names, rows, live)
            for user_id in names:
                count = len(found.get(user_id, []))
                report.users[user_id] = UserOutcome(count, self.queue_enabled and count == 0)
                report.delivered_to += count
        elif target.kind in ("channel", "channels"):
            placement = parse_channel_nodes(names, rows, live)
            for channel in names:
                report.channels[channel] = sum(placement.get(channel, {}).values())
                report.delivered_to += report.channels[channel]
        else:
            counts = parse_tenant_counts(rows[0], live)
            report.delivered_to = counts["websocket"] + counts["sse"]
        return report
