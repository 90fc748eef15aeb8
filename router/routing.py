"""Routing accepted notifications: mailbox first, then live sockets.

With at-least-once delivery a user-targeted notification is written to the
user's mailbox *before* the session lookup that decides the live delivery. A
connection that registers after that lookup therefore finds it in the mailbox
when it replays, and one that registered before gets it live: there is no
window in which it is in neither. With at-most-once only offline users are
queued, and the lookup is repeated after the write so a user who connected
meanwhile still gets it.

At-least-once also looks the users up once *before* the write, only to store
each row's ``delivered`` flag with the row (no second write per notification to
mark it). That early lookup never decides a delivery, so the argument above is
unchanged, and it may be answered from what the lookups of the last second
found (``PresenceCache``): at low rates every batch is one notification, and the
early lookup was one of its five round trips. The two lookups disagree only for
a user who (dis)connected in the moments between them (up to a second with a
remembered answer): one found only by the later lookup gets the
``mark_delivered`` write; one found only by the earlier lookup keeps a row
flagged delivered that no gateway was handed, as any row does whose connection
closes between the lookup and the gateway's write (the flag only makes a replay
say ``redelivered``).

Routing works on batches so a router pays one mailbox write, one pipelined
session lookup (two with at-least-once) and one pipelined stream append per
batch, not per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.backends.base import (
    Delivery,
    Mailbox,
    MailboxPut,
    NodeDelivery,
    RouteReport,
    SessionInfo,
    SessionStore,
    UserOutcome,
)
from common.protocol import Notification, Target
from common.settings import Settings
from common.telemetry import carrier, span, tracing_enabled

log = logging.getLogger("ara.router")

Accepted = tuple[Notification, Target]
UserKey = tuple[str, str]  # (tenant, user)

PRESENCE_TTL_SECONDS = 1.0
PRESENCE_MAX_USERS = 100_000
# A large batch shares one early lookup among many notifications: for it the cache
# would be bookkeeping per user with nothing to save.
PRESENCE_BATCH_USERS = 32


class PresenceCache:
    """Whether each recently looked-up user had live sessions, for the rows' flag only.

    Never consulted for a delivery: the lookup after the mailbox write always goes
    to the session store. Bounded: when full it starts over.
    """

    def __init__(self, ttl: float = PRESENCE_TTL_SECONDS,
                 max_users: int = PRESENCE_MAX_USERS) -> None:
        self.ttl = ttl
        self.max_users = max_users
        self._seen: dict[UserKey, tuple[float, bool]] = {}

    def online_among(self, keys: Sequence[UserKey]) -> set[UserKey] | None:
        """The online ones among ``keys`` if every one was looked up within the TTL."""
        oldest = time.monotonic() - self.ttl
        online: set[UserKey] = set()
        for key in keys:
            seen = self._seen.get(key)
            if seen is None or seen[0] < oldest:
                return None
            if seen[1]:
                online.add(key)
        return online

    def remember(self, found: dict[UserKey, list[SessionInfo]]) -> None:
        if len(self._seen) + len(found) > self.max_users:
            self._seen.clear()
        now = time.monotonic()
        for key, sessions in found.items():
            self._seen[key] = (now, bool(sessions))


@dataclass(slots=True)
class BatchResult:
    """Reports in input order, plus the mailbox writes that could not be made."""

    reports: list[RouteReport]
    unwritten: list[MailboxPut] = field(default_factory=list)


class Router:
    """Resolves targets through the session store and hands them to gateways."""

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
        self.presence = PresenceCache()

    async def dispatch(self, notification: Notification, target: Target) -> RouteReport:
        """``Dispatcher`` for the embedded node: route inline, in this process."""
        return (await self.route_many([(notification, target)])).reports[0]

    async def route_many(self, batch: Sequence[Accepted], mailbox_up: bool = True) -> BatchResult:
        """Route a batch in order. With ``mailbox_up`` False, live delivery still
        happens and the mailbox writes are returned for a later retry."""
        reports = [RouteReport() for _ in batch]
        live = [i for i, (n, _) in enumerate(batch) if not n.expired()]
        for i in set(range(len(batch))) - set(live):
            reports[i].error = "expired"
        result = BatchResult(reports)

        user_items = [i for i in live if batch[i][1].kind in ("user", "users")]
        grouped = self._by_tenant(
            {(batch[i][0].tenant_id, u) for i in user_items for u in batch[i][1].user_ids})
        # Users whose rows were written already flagged delivered (at-least-once).
        flagged: set[tuple[str, str]] = set()
        if self.at_least_once and user_items:
            # Only for the rows' ``delivered`` flag: the lookup that decides the live
            # delivery comes after the write (module docstring).
            before: dict[UserKey, list[SessionInfo]] | None = None
            small = sum(len(users) for users in grouped.values()) <= PRESENCE_BATCH_USERS
            remembered = self.presence.online_among(
                [(tenant, u) for tenant, users in grouped.items() for u in users]
            ) if small else None
            if remembered is None:
                before = await self._lookup(grouped)
                if small:
                    self.presence.remember(before)
                flagged = {key for key, found in before.items() if found}
            else:
                flagged = remembered
            puts = [
                MailboxPut(u, n, delivered=(n.tenant_id, u) in flagged)
                for i in user_items
                for n in (batch[i][0],)
                for u in dict.fromkeys(batch[i][1].user_ids)
            ]
            if mailbox_up:
                await self.mailbox.put(puts)
                sessions = await self._lookup(grouped)
                if small:
                    self.presence.remember(sessions)
            else:
                # Nothing was written (it is retried later), so there is no commit to
                # order the delivery lookup after: the one lookup serves, as before.
                result.unwritten.extend(puts)
                sessions = before if before is not None else await self._lookup(grouped)
        else:
            sessions = await self._lookup(grouped)
        if not self.at_least_once and self.queue_enabled and user_items:
            puts = [
                MailboxPut(u, batch[i][0], delivered=False)
                for i in user_items
                for u in dict.fromkeys(batch[i][1].user_ids)
                if not sessions.get((batch[i][0].tenant_id, u))
            ]
            if puts:
                if mailbox_up:
                    await self.mailbox.put(puts)
                    # Someone may have connected while we wrote: look again.
                    sessions.update(await self._lookup(self._by_tenant(
                        {(p.notification.tenant_id, p.user_id) for p in puts})))
                else:
                    result.unwritten.extend(puts)

        deliveries: list[tuple[str, Delivery]] = []
        delivered_pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for i in live:
            n, target = batch[i]
            report = reports[i]
            if target.kind in ("user", "users"):
                by_node: dict[str, list[str]] = defaultdict(list)
                for user_id in dict.fromkeys(target.user_ids):
                    found = sessions.get((n.tenant_id, user_id), [])
                    report.users[user_id] = UserOutcome(
                        connections=len(found), queued=self.queue_enabled and not found
                    )
                    report.delivered_to += len(found)
                    for node in {s.node_id for s in found}:
                        by_node[node].append(user_id)
                    if found and self.at_least_once and (n.tenant_id, user_id) not in flagged:
                        delivered_pairs[n.tenant_id].append((user_id, n.id))
                for node, users in by_node.items():
                    deliveries.append((node, Delivery("users", n, user_ids=tuple(users))))
            elif target.kind in ("channel", "channels"):
                channels = tuple(dict.fromkeys(target.channels))
                placement = await self.sessions.channel_nodes(n.tenant_id, channels)
                nodes: set[str] = set()
                for channel in channels:
                    counts = placement.get(channel, {})
                    report.channels[channel] = sum(counts.values())
                    report.delivered_to += report.channels[channel]
                    nodes.update(counts)
                shared = Delivery("channels", n, channels=channels)
                deliveries.extend((node, shared) for node in sorted(nodes))
            else:
                report.delivered_to = await self.sessions.tenant_connections(n.tenant_id)
                shared = Delivery("broadcast", n)
                deliveries.extend((node, shared) for node in await self.sessions.live_nodes())

        if tracing_enabled():
            self._trace_routes(batch, live, reports)
        # The "delivered" marks left (users who connected between the two lookups)
        # only depend on the lookup, so they are written while the deliveries go out.
        marks = [
            self.mailbox.mark_delivered(tenant, pairs)
            for tenant, pairs in (delivered_pairs.items() if mailbox_up else ())
        ]
        if not marks:
            await self._deliver(deliveries, batch, reports)
            return result
        outcomes = await asyncio.gather(self._deliver(deliveries, batch, reports), *marks,
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return result

    @staticmethod
    def _trace_routes(
        batch: Sequence[Accepted], live: list[int], reports: list[RouteReport]
    ) -> None:
        """One ``ara.route`` span per notification, under its dispatch span; the
        notification then carries the route span's context on to the gateways."""
        for i in live:
            n, target = batch[i]
            with span("ara.route", parent=n.trace, attributes={
                "ara.notification_id": n.id, "ara.target": target.kind,
                "ara.delivered_to": reports[i].delivered_to,
            }):
                n.trace = carrier()

    @staticmethod
    def _by_tenant(pairs: set[tuple[str, str]]) -> dict[str, list[str]]:
        """(tenant, user) pairs grouped per tenant, built once per batch and reused by
        both at-least-once lookups."""
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for tenant, user in sorted(pairs):
            by_tenant[tenant].append(user)
        return by_tenant

    async def _lookup(
        self, by_tenant: dict[str, list[str]]
    ) -> dict[tuple[str, str], list[SessionInfo]]:
        found: dict[tuple[str, str], list[SessionInfo]] = {}
        for tenant, users in by_tenant.items():
            for user, sessions in (await self.sessions.sessions_of(tenant, users)).items():
                found[(tenant, user)] = sessions
        return found

    async def _deliver(
        self,
        deliveries: list[tuple[str, Delivery]],
        batch: Sequence[Accepted],
        reports: list[RouteReport],
    ) -> None:
        if not deliveries:
            return
        deliver_many = getattr(self.delivery, "deliver_many", None)
        try:
            if deliver_many is not None:
                await deliver_many(deliveries)
                return
            for node, delivery in deliveries:
                await self.delivery.deliver(node, delivery)
        except Exception:
            log.exception("handing %d deliveries to gateways failed", len(deliveries))
            index = {id(n): i for i, (n, _) in enumerate(batch)}
            for _, delivery in deliveries:
                i = index.get(id(delivery.notification))
                if i is not None:
                    reports[i].failed += 1
