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

The same early answer says which gateways to send to ahead of the later lookup,
in its round trip (``_lookup_sending_ahead``); the later lookup still decides,
by sending to every gateway it finds that was not sent to.

Receipts: the router records the receipts of the entries that ask it to, in the
batch's one durable write, so they exist before any gateway is handed the
notification (an ACK always finds its receipt). Their counts come from the early
answer and are corrected when the deciding lookup disagrees.

Routing works on batches so a router pays one durable write, one pipelined
session lookup (two with at-least-once, the deliveries riding with the second)
and one pipelined stream append per batch, not per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass, field

from common.backends.base import (
    Delivery,
    Mailbox,
    MailboxPut,
    NodeDelivery,
    ReceiptRow,
    ReceiptStore,
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
    """Which gateways hold each recently looked-up user's sessions, for the rows' flag,
    the receipts' first count and the deliveries sent with the lookup after the write.

    Never what decides a delivery: the lookup after the mailbox write always goes to
    the session store, and what it finds is delivered. Bounded: when full it starts
    over.
    """

    def __init__(self, ttl: float = PRESENCE_TTL_SECONDS,
                 max_users: int = PRESENCE_MAX_USERS) -> None:
        self.ttl = ttl
        self.max_users = max_users
        self._seen: dict[UserKey, tuple[float, tuple[str, ...]]] = {}

    def nodes_among(self, keys: Sequence[UserKey]) -> dict[UserKey, tuple[str, ...]] | None:
        """Each of ``keys``' sessions' gateways (one per session), if every one was
        looked up within the TTL."""
        oldest = time.monotonic() - self.ttl
        nodes: dict[UserKey, tuple[str, ...]] = {}
        for key in keys:
            seen = self._seen.get(key)
            if seen is None or seen[0] < oldest:
                return None
            nodes[key] = seen[1]
        return nodes

    def remember(self, found: dict[UserKey, list[SessionInfo]]) -> None:
        if len(self._seen) + len(found) > self.max_users:
            self._seen.clear()
        now = time.monotonic()
        for key, sessions in found.items():
            self._seen[key] = (now, session_nodes(sessions))


def session_nodes(sessions: Sequence[SessionInfo]) -> tuple[str, ...]:
    return tuple(s.node_id for s in sessions)


@dataclass(slots=True)
class BatchResult:
    """Reports in input order, plus the durable writes that could not be made."""

    reports: list[RouteReport]
    unwritten: list[MailboxPut] = field(default_factory=list)
    unwritten_receipts: list[ReceiptRow] = field(default_factory=list)


@dataclass(slots=True)
class _Fanout:
    """Where a channel or broadcast notification goes: gateways, and the shared delivery."""

    nodes: list[str]
    delivery: Delivery


class Router:
    """Resolves targets through the session store and hands them to gateways.

    With ``receipts`` given, the router records the receipts of the notifications it
    is told to (``route_many``'s ``record``): in the batch's one durable write, before
    anything is delivered, so an ACK always finds its receipt.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: SessionStore,
        mailbox: Mailbox,
        delivery: NodeDelivery,
        receipts: ReceiptStore | None = None,
    ) -> None:
        self.sessions = sessions
        self.mailbox = mailbox
        self.delivery = delivery
        self.receipts = receipts
        self.queue_enabled = settings.queue_enabled
        self.at_least_once = settings.at_least_once and settings.queue_enabled
        self.presence = PresenceCache()

    async def dispatch(self, notification: Notification, target: Target) -> RouteReport:
        """``Dispatcher`` for the embedded node: route inline, in this process."""
        return (await self.route_many([(notification, target)])).reports[0]

    async def route_many(
        self, batch: Sequence[Accepted], mailbox_up: bool = True, record: Collection[str] = (),
    ) -> BatchResult:
        """Route a batch in order. With ``mailbox_up`` False, live delivery still
        happens and the durable writes are returned for a later retry. ``record``:
        ids of the notifications whose receipts this router records."""
        reports = [RouteReport() for _ in batch]
        live = [i for i, (n, _) in enumerate(batch) if not n.expired()]
        for i in set(range(len(batch))) - set(live):
            reports[i].error = "expired"
        result = BatchResult(reports)

        user_items = [i for i in live if batch[i][1].kind in ("user", "users")]
        grouped = self._by_tenant(
            {(batch[i][0].tenant_id, u) for i in user_items for u in batch[i][1].user_ids})
        sessions: dict[UserKey, list[SessionInfo]] = {}
        # Where the users' sessions were before the durable write: the rows'
        # ``delivered`` flag (at-least-once), the receipts' ``delivered_to``, and the
        # deliveries sent ahead with the lookup after the write.
        early: dict[UserKey, tuple[str, ...]] = {}
        before: dict[UserKey, list[SessionInfo]] | None = None
        small = sum(len(users) for users in grouped.values()) <= PRESENCE_BATCH_USERS
        puts: list[MailboxPut] = []
        if self.at_least_once and user_items:
            # Only for the flag and the counts: the lookup that decides the live
            # delivery comes after the write (module docstring).
            remembered = self.presence.nodes_among(
                [(tenant, u) for tenant, users in grouped.items() for u in users]
            ) if small else None
            if remembered is None:
                before = await self._lookup(grouped)
                if small:
                    self.presence.remember(before)
                early = {key: session_nodes(found) for key, found in before.items()}
            else:
                early = remembered
            counts = {key: len(nodes) for key, nodes in early.items()}
            puts = [
                MailboxPut(u, n, delivered=counts.get((n.tenant_id, u), 0) > 0)
                for i in user_items
                for n in (batch[i][0],)
                for u in dict.fromkeys(batch[i][1].user_ids)
            ]
        elif user_items:
            sessions = await self._lookup(grouped)
            counts = {key: len(found) for key, found in sessions.items()}
            if self.queue_enabled:
                puts = [
                    MailboxPut(u, batch[i][0], delivered=False)
                    for i in user_items
                    for u in dict.fromkeys(batch[i][1].user_ids)
                    if not sessions.get((batch[i][0].tenant_id, u))
                ]
        else:
            counts = {}
        fanouts = await self._fan_out(batch, live, reports)

        receipts: list[ReceiptRow] = []
        recorded: list[int] = []  # the batch index of each of ``receipts``
        if self.receipts is not None and record:
            for i, (n, target) in enumerate(batch):
                if n.id not in record:
                    continue
                recorded.append(i)
                if i in fanouts or reports[i].error:
                    receipts.append((n, target, reports[i].delivered_to))
                else:
                    receipts.append((n, target, sum(
                        counts.get((n.tenant_id, u), 0) for u in dict.fromkeys(target.user_ids))))
        if puts or receipts:
            if mailbox_up:
                await self.mailbox.put(puts, receipts)
            else:
                # Nothing was written (it is retried later), so there is no commit to
                # order the delivery lookup after: the one lookup serves, as before.
                result.unwritten.extend(puts)
                result.unwritten_receipts.extend(receipts)
        # Deliveries already handed over, to the gateways of ``early``.
        sent_ahead = False
        if self.at_least_once and user_items:
            if mailbox_up:
                sessions, sent_ahead = await self._lookup_sending_ahead(
                    grouped, batch, user_items, early, reports)
                if small:
                    self.presence.remember(sessions)
            else:
                sessions = before if before is not None else await self._lookup(grouped)
        elif puts and mailbox_up:
            # Someone may have connected while we wrote: look again.
            sessions.update(await self._lookup(self._by_tenant(
                {(p.notification.tenant_id, p.user_id) for p in puts})))

        deliveries: list[tuple[str, Delivery]] = []
        delivered_pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for i in live:
            n, target = batch[i]
            report = reports[i]
            fanout = fanouts.get(i)
            if fanout is not None:
                deliveries.extend((node, fanout.delivery) for node in fanout.nodes)
                continue
            by_node: dict[str, list[str]] = defaultdict(list)
            for user_id in dict.fromkeys(target.user_ids):
                key = (n.tenant_id, user_id)
                found = sessions.get(key, [])
                report.users[user_id] = UserOutcome(
                    connections=len(found), queued=self.queue_enabled and not found
                )
                report.delivered_to += len(found)
                ahead = early.get(key, ()) if sent_ahead else ()
                for node in {s.node_id for s in found}:
                    if node not in ahead:
                        by_node[node].append(user_id)
                if found and self.at_least_once and not counts.get(key):
                    delivered_pairs[n.tenant_id].append((user_id, n.id))
            for node, users in by_node.items():
                deliveries.append((node, Delivery("users", n, user_ids=tuple(users))))
        # Receipts written with a count the delivery lookup then contradicted (a user
        # who (dis)connected in between).
        recounts = [
            (n.id, reports[i].delivered_to)
            for i, (n, _, written) in zip(recorded, receipts, strict=True)
            if written != reports[i].delivered_to
        ] if mailbox_up else []

        if tracing_enabled():
            self._trace_routes(batch, live, reports)
        # The "delivered" marks left (users who connected between the two lookups)
        # and the recounts only depend on the lookup, so they are written while the
        # deliveries go out.
        fixes: list[Awaitable[None]] = [
            self.mailbox.mark_delivered(tenant, pairs)
            for tenant, pairs in (delivered_pairs.items() if mailbox_up else ())
        ]
        if recounts and self.receipts is not None:
            fixes.append(self.receipts.set_delivered(recounts))
        if not fixes:
            await self._deliver(deliveries, batch, reports)
            return result
        outcomes = await asyncio.gather(self._deliver(deliveries, batch, reports), *fixes,
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return result

    async def _lookup_sending_ahead(
        self, grouped: dict[str, list[str]], batch: Sequence[Accepted], user_items: list[int],
        early: dict[UserKey, tuple[str, ...]], reports: list[RouteReport],
    ) -> tuple[dict[UserKey, list[SessionInfo]], bool]:
        """The lookup after the write, with the deliveries to ``early``'s gateways sent in
        the same round trip where the backends allow it (Redis).

        The lookup still decides: whoever it finds on a gateway not sent to yet gets the
        notification from the caller afterwards, and a gateway sent to that no longer
        holds the user writes it to nobody. What is sent ahead depends only on the
        earlier answer, so it needs no round trip of its own. Returns the sessions and
        whether anything was sent ahead (then the caller skips ``early``'s gateways).
        """
        lookup_with = getattr(self.sessions, "sessions_with", None)
        commands_of = getattr(self.delivery, "commands", None)
        ahead: list[tuple[str, Delivery]] = []
        for i in user_items:
            n, target = batch[i]
            by_node: dict[str, list[str]] = defaultdict(list)
            for user_id in dict.fromkeys(target.user_ids):
                for node in dict.fromkeys(early.get((n.tenant_id, user_id), ())):
                    by_node[node].append(user_id)
            ahead.extend((node, Delivery("users", n, user_ids=tuple(users)))
                         for node, users in by_node.items())
        # (With tracing on, deliveries carry the route span, which needs the lookup.)
        if not ahead or lookup_with is None or commands_of is None or tracing_enabled():
            return await self._lookup(grouped), False
        found, replies = await lookup_with(grouped, commands_of(ahead))
        if any(isinstance(reply, Exception) for reply in replies):
            log.error("handing %d deliveries to gateways failed: %s", len(ahead),
                      next(r for r in replies if isinstance(r, Exception)))
            index = {id(n): i for i, (n, _) in enumerate(batch)}
            for _, delivery in ahead:
                reports[index[id(delivery.notification)]].failed += 1
        return found, True

    async def _fan_out(
        self, batch: Sequence[Accepted], live: list[int], reports: list[RouteReport]
    ) -> dict[int, _Fanout]:
        """Channel and broadcast targets: their gateways and counts (into ``reports``).

        Looked up before the durable write, since they are never mailboxed and their
        receipts carry the counts.
        """
        fanouts: dict[int, _Fanout] = {}
        for i in live:
            n, target = batch[i]
            report = reports[i]
            if target.kind in ("channel", "channels"):
                channels = tuple(dict.fromkeys(target.channels))
                placement = await self.sessions.channel_nodes(n.tenant_id, channels)
                nodes: set[str] = set()
                for channel in channels:
                    found = placement.get(channel, {})
                    report.channels[channel] = sum(found.values())
                    report.delivered_to += report.channels[channel]
                    nodes.update(found)
                fanouts[i] = _Fanout(sorted(nodes), Delivery("channels", n, channels=channels))
            elif target.kind == "broadcast":
                report.delivered_to = await self.sessions.tenant_connections(n.tenant_id)
                fanouts[i] = _Fanout(await self.sessions.live_nodes(), Delivery("broadcast", n))
        return fanouts

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
