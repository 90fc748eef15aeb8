"""Routing of one accepted notification: mailbox first, then live sockets.

With at-least-once delivery a user-targeted notification is written to the
user's mailbox *before* the session lookup. A connection that registers
after the lookup therefore finds it in the mailbox when it replays, and one
that registered before gets it live: no window in which it is in neither.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from common.backends.base import (
    Delivery,
    Mailbox,
    MailboxPut,
    NodeDelivery,
    RouteReport,
    SessionStore,
    UserOutcome,
)
from common.protocol import Notification, Target
from common.settings import Settings

log = logging.getLogger("ara.router")


class Router:
    """Resolves a target through the session store and hands it to gateways."""

    def __init__(
        self,
        settings: Settings,
        sessions: SessionStore,
        mailbox: Mailbox,
        delivery: NodeDelivery,
    ) -> None:
        self.sessions = sessions
        self.mailbox = mailbox
        self.delivery = delivery
        self.queue_enabled = settings.queue_enabled
        self.at_least_once = settings.at_least_once and settings.queue_enabled

    async def route(self, notification: Notification, target: Target) -> RouteReport:
        if notification.expired():
            return RouteReport(error="expired")
        if target.kind in ("user", "users"):
            return await self._route_users(notification, target.user_ids)
        if target.kind in ("channel", "channels"):
            return await self._route_channels(notification, target.channels)
        return await self._route_broadcast(notification)

    async def _route_users(self, n: Notification, user_ids: tuple[str, ...]) -> RouteReport:
        unique = list(dict.fromkeys(user_ids))
        tenant = n.tenant_id
        if self.at_least_once:
            # Mailbox first (see module docstring), then the session lookup.
            await self.mailbox.put([MailboxPut(u, n, delivered=False) for u in unique])
            sessions = await self.sessions.sessions_of(tenant, unique)
        else:
            sessions = await self.sessions.sessions_of(tenant, unique)
            offline = [u for u in unique if not sessions.get(u)]
            if self.queue_enabled and offline:
                await self.mailbox.put([MailboxPut(u, n, delivered=False) for u in offline])
        report = RouteReport()
        by_node: dict[str, list[str]] = defaultdict(list)
        for user_id in unique:
            found = sessions.get(user_id) or []
            outcome = UserOutcome(connections=len(found))
            outcome.queued = self.queue_enabled and (not found)
            report.users[user_id] = outcome
            report.delivered_to += len(found)
            for node in {s.node_id for s in found}:
                by_node[node].append(user_id)
        for node, users in by_node.items():
            await self._deliver(node, Delivery("users", n, user_ids=tuple(users)), report)
        if self.at_least_once:
            # Mark what went out live so a later replay flags it ``redelivered``.
            live = [(u, n.id) for u, outcome in report.users.items() if outcome.connections]
            if live:
                await self.mailbox.mark_delivered(tenant, live)
        return report

    async def _route_channels(self, n: Notification, channels: tuple[str, ...]) -> RouteReport:
        unique = tuple(dict.fromkeys(channels))
        placement = await self.sessions.channel_nodes(n.tenant_id, unique)
        report = RouteReport()
        nodes: set[str] = set()
        for channel in unique:
            counts = placement.get(channel, {})
            report.channels[channel] = sum(counts.values())
            report.delivered_to += report.channels[channel]
            nodes.update(counts)
        for node in nodes:
            await self._deliver(node, Delivery("channels", n, channels=unique), report)
        return report

    async def _route_broadcast(self, n: Notification) -> RouteReport:
        report = RouteReport(delivered_to=await self.sessions.tenant_connections(n.tenant_id))
        for node in await self.sessions.live_nodes():
            await self._deliver(node, Delivery("broadcast", n), report)
        return report

    async def _deliver(self, node: str, delivery: Delivery, report: RouteReport) -> None:
        try:
            await self.delivery.deliver(node, delivery)
        except Exception:
            log.exception("delivery to node %s failed", node)
            report.failed += 1

    async def dispatch(self, notification: Notification, target: Target) -> RouteReport:
        """``Dispatcher`` for the embedded node: route inline, in this process."""
        return await self.route(notification, target)
