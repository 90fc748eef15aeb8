"""``PostgresMailbox`` and the at-least-once write path, against a real Postgres.

The per-user bound is applied by reads and before deletes instead of on every
write (see ``PostgresMailbox``); these tests hold it to what a mailbox trimmed on
every write shows, through random sequences of writes, ACKs, removals and purges.
The router writes each row with its ``delivered`` flag from a lookup before the
write and decides the live delivery with a lookup after it; the last test pins
that order and the flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from common.backends.base import Delivery, MailboxPut, ReceiptRow, SessionInfo
from common.backends.postgres import PostgresHandle, PostgresMailbox, PostgresReceipts, migrate
from common.protocol import Notification, Target
from common.settings import load_settings
from router.routing import Router
from tests.cluster_harness import create_database, drop_database, pg_admin_dsn
from tests.conftest import TEST_JWT_SECRET

pytestmark = pytest.mark.cluster


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    admin = pg_admin_dsn()
    url = await create_database(admin)
    try:
        await migrate(url)
        yield url
    finally:
        await drop_database(admin, url)


@pytest.fixture
async def pg(dsn: str) -> AsyncIterator[PostgresHandle]:
    handle = PostgresHandle(dsn)
    await handle.open()
    try:
        yield handle
    finally:
        await handle.close()


@contextlib.asynccontextmanager
async def opened(url: str, max_per_user: int) -> AsyncIterator[PostgresMailbox]:
    pg = PostgresHandle(url)
    await pg.open()
    try:
        yield PostgresMailbox(pg, max_per_user)
    finally:
        await pg.close()


def note(i: int, expired: bool = False) -> Notification:
    if expired:  # created 100 s ago with a 50 s lifetime
        return Notification.create("t", "e", {"i": i}, default_ttl=50, now=time.time() - 100)
    return Notification.create("t", "e", {"i": i}, default_ttl=3600)


@dataclass
class TrimOnWrite:
    """The reference: a mailbox that cuts each user to its newest rows on every write."""

    max_per_user: int
    rows: dict[str, list[tuple[str, bool, bool]]] = field(default_factory=dict)

    def put(self, items: Sequence[tuple[str, str, bool]]) -> None:
        for user, nid, expired in items:
            box = self.rows.setdefault(user, [])
            if all(r[0] != nid for r in box):
                box.append((nid, expired, False))
        for box in self.rows.values():
            del box[: max(0, len(box) - self.max_per_user)]

    def delete(self, user: str, ids: Sequence[str]) -> int:
        box = self.rows.get(user, [])
        kept = [r for r in box if r[0] not in ids]
        self.rows[user] = kept
        return len(box) - len(kept)

    def purge(self) -> int:
        gone = 0
        for user, box in self.rows.items():
            kept = [r for r in box if not r[1]]
            gone += len(box) - len(kept)
            self.rows[user] = kept
        return gone

    def pending(self, user: str) -> list[str]:
        return [r[0] for r in self.rows.get(user, []) if not r[1]]

    def all_ids(self, user: str) -> list[str]:
        return [r[0] for r in self.rows.get(user, [])]


async def test_reads_show_the_trim_on_write_bound_through_acks_removes_and_purges(
    dsn: str,
) -> None:
    rng = random.Random(20261125)
    users = ["a", "b", "c"]
    ref = TrimOnWrite(max_per_user=4)
    written: dict[str, list[MailboxPut]] = {u: [] for u in users}
    counter = 0
    async with opened(dsn, max_per_user=4) as box:
        for step in range(160):
            op = rng.random()
            if op < 0.5:
                items: list[MailboxPut] = []
                for _ in range(rng.randint(1, 9)):
                    counter += 1
                    user = rng.choice(users)
                    items.append(MailboxPut(user, note(counter, rng.random() < 0.15), False))
                visible = ref.all_ids("a")
                if visible and rng.random() < 0.3:  # an entry routed twice, still visible
                    items.append(next(p for p in written["a"]
                                      if p.notification.id == visible[-1]))
                await box.put(items)
                ref.put([(i.user_id, i.notification.id, i.notification.expired())
                         for i in _newest_per_user(items, 4)])
                for i in items:
                    written[i.user_id].append(i)
            elif op < 0.75:
                user = rng.choice(users)
                if not written[user]:
                    continue
                nid = rng.choice(written[user]).notification.id  # often beyond the bound
                expected = ref.delete(user, [nid]) > 0
                assert await box.ack("t", user, nid) is expected, step
            elif op < 0.85:
                user = rng.choice(users)
                ids = [p.notification.id
                       for p in rng.sample(written[user], min(len(written[user]), 3))]
                ref.delete(user, ids)
                await box.remove("t", user, ids)
            else:
                ref.purge()
                await box.purge_expired(time.time())
            for user in users:
                got = [e.notification.id for e in await box.pending("t", user)]
                assert got == ref.pending(user), (step, user)
            depth = sum(len(ref.all_ids(u)) for u in users)
            assert await box.depth() == depth, step
            assert await box.depth("t") == depth and await box.depth("other") == 0


def _newest_per_user(items: list[MailboxPut], bound: int) -> list[MailboxPut]:
    """What one write keeps of a batch: each user's newest ``bound`` items."""
    seen: dict[str, int] = {}
    kept = []
    for item in reversed(items):
        seen[item.user_id] = seen.get(item.user_id, 0) + 1
        if seen[item.user_id] <= bound:
            kept.append(item)
    return kept[::-1]


async def test_purge_trims_storage_and_concurrent_purges_do_not_overlap(dsn: str) -> None:
    async with opened(dsn, max_per_user=3) as box:
        for i in range(10):  # one batch would only carry its newest 3 for a user
            await box.put([MailboxPut("a", note(i), False)])
        await box.put([MailboxPut("b", note(i), False) for i in range(2)])
        for i in range(5):
            await box.put([MailboxPut("c", note(i, expired=True), False)])
        conn = await asyncpg.connect(dsn)
        try:
            counts = dict(await conn.fetch(
                "SELECT user_id, count(*) FROM ara_mailbox GROUP BY 1"))
            assert counts == {"a": 10, "b": 2, "c": 5}  # nothing cut on write
            async with conn.transaction():
                await conn.execute("SELECT upto FROM ara_mailbox_trim FOR UPDATE")
                # Another purge holds the mark: this one leaves the work to it.
                assert await asyncio.wait_for(box.purge_expired(time.time()), 5) == 0
            assert await box.purge_expired(time.time()) == 3  # c's visible expired rows
            counts = dict(await conn.fetch(
                "SELECT user_id, count(*) FROM ara_mailbox GROUP BY 1"))
            assert counts == {"a": 3, "b": 2}
            assert box.dropped == 7 + 2  # a: 7 beyond the bound; c: 2 beyond it
            # The next purge starts after the highest row this one saw (c's last, gone).
            mark = await conn.fetchval("SELECT upto FROM ara_mailbox_trim")
            assert mark == await conn.fetchval("SELECT last_value FROM ara_mailbox_seq_seq")
            # Without its mark row a purge starts over instead of stopping for good.
            await conn.execute("DELETE FROM ara_mailbox_trim")
            await box.put([MailboxPut("d", note(0, expired=True), False)])
            assert await box.purge_expired(time.time()) == 1
            assert await conn.fetchval("SELECT upto FROM ara_mailbox_trim") == mark + 1
        finally:
            await conn.close()


async def test_rows_already_there_are_skipped_and_order_is_kept(dsn: str) -> None:
    async with opened(dsn, max_per_user=100) as box:
        first = [MailboxPut("a", note(i), False) for i in range(3)]
        await box.put(first)
        more = [MailboxPut("a", note(i), True) for i in range(3, 6)]
        # The COPY fails on the existing row and the batch is inserted without it.
        await box.put([more[0], first[1], more[1], more[2], more[1]])
        entries = await box.pending("t", "a")
        assert [e.notification.id for e in entries] == [p.notification.id for p in first + more]
        assert [e.delivered for e in entries] == [False] * 3 + [True] * 3


@dataclass
class Sessions:
    """A session store whose answers change from one lookup to the next."""

    answers: list[dict[str, list[str]]]
    log: list[str]
    calls: int = 0

    async def sessions_of(
        self, tenant_id: str, user_ids: Sequence[str]
    ) -> dict[str, list[SessionInfo]]:
        online = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        self.log.append("lookup")
        return {
            u: [SessionInfo(f"c-{u}-{node}", tenant_id, u, node, "websocket", 0.0)
                for node in online.get(u, [])]
            for u in user_ids
        }


@dataclass
class Recorder:
    log: list[str]
    deliveries: list[tuple[str, Delivery]] = field(default_factory=list)

    async def deliver(self, node_id: str, delivery: Delivery) -> None:
        self.log.append("deliver")
        self.deliveries.append((node_id, delivery))


class LoggedMailbox(PostgresMailbox):
    def __init__(self, pg: PostgresHandle, log: list[str]) -> None:
        super().__init__(pg, 100)
        self.log = log

    async def put(
        self, items: Sequence[MailboxPut], receipts: Sequence[ReceiptRow] = ()
    ) -> None:
        await super().put(items, receipts)
        self.log.append("committed")

    async def mark_delivered(self, tenant_id: str, pairs: Sequence[tuple[str, str]]) -> None:
        self.log.append(f"mark {sorted(pairs)}")
        await super().mark_delivered(tenant_id, pairs)


async def test_router_flags_rows_on_write_and_looks_up_again_after_the_commit(
    pg: PostgresHandle,
) -> None:
    log: list[str] = []
    mailbox = LoggedMailbox(pg, log)
    # "on" stays online; "late" connects between the lookups; "gone" leaves.
    sessions = Sessions([{"on": ["n1"], "gone": ["n2"]}, {"on": ["n1"], "late": ["n3"]}],
                        log)
    delivery = Recorder(log)
    router = Router(load_settings(jwt_secret=TEST_JWT_SECRET), sessions,  # type: ignore[arg-type]
                    mailbox, delivery)
    n = Notification.create("t", "e", {}, default_ttl=60)
    report = await router.dispatch(n, Target("users", user_ids=("on", "late", "gone")))
    # The lookup that decides the live delivery comes after the row is committed.
    assert log[:3] == ["lookup", "committed", "lookup"]
    assert sorted(log[3:]) == ["deliver", "deliver", f"mark {[('late', n.id)]}"]
    assert sorted(node for node, _ in delivery.deliveries) == ["n1", "n3"]
    assert report.delivered_to == 2 and report.users["gone"].queued
    flags = {u: [e.delivered for e in await mailbox.pending("t", u)]
             for u in ("on", "late", "gone")}
    assert flags == {"on": [True], "late": [True], "gone": [True]}


async def test_router_flags_rows_from_a_recent_lookup_but_always_looks_up_to_deliver(
    pg: PostgresHandle,
) -> None:
    log: list[str] = []
    mailbox = LoggedMailbox(pg, log)
    # Lookups: before #1, after #1 ("on" online), after #2 ("on" gone, "late" there).
    sessions = Sessions([{"on": ["n1"]}, {"on": ["n1"]}, {"late": ["n3"]}], log)
    delivery = Recorder(log)
    router = Router(load_settings(jwt_secret=TEST_JWT_SECRET), sessions,  # type: ignore[arg-type]
                    mailbox, delivery)
    first = Notification.create("t", "e", {}, default_ttl=60)
    await router.dispatch(first, Target("users", user_ids=("on", "late")))
    assert log == ["lookup", "committed", "lookup", "deliver"]
    log.clear()
    # Both users were looked up a moment ago: the row flags come from that answer,
    # and the lookup after the commit still decides who gets it live.
    second = Notification.create("t", "e", {}, default_ttl=60)
    report = await router.dispatch(second, Target("users", user_ids=("on", "late")))
    assert log[:2] == ["committed", "lookup"]
    assert sorted(log[2:]) == ["deliver", f"mark {[('late', second.id)]}"]
    assert [node for node, _ in delivery.deliveries] == ["n1", "n3"]
    assert report.delivered_to == 1 and report.users["on"].queued
    flags = {u: [e.delivered for e in await mailbox.pending("t", u)] for u in ("on", "late")}
    # "on": online in every answer; "late": offline when remembered, marked once found.
    assert flags == {"on": [True, True], "late": [False, True]}
    log.clear()
    # A user not looked up recently sends the batch back to the early lookup.
    router.presence.ttl = 0.0
    third = Notification.create("t", "e", {}, default_ttl=60)
    await router.dispatch(third, Target("user", user_ids=("late",)))
    assert log[:3] == ["lookup", "committed", "lookup"]


async def test_router_records_receipts_in_its_write_before_delivering_and_recounts(
    pg: PostgresHandle,
) -> None:
    log: list[str] = []
    mailbox = LoggedMailbox(pg, log)
    receipts = PostgresReceipts(pg)
    seen_at_delivery: list[int | None] = []

    class Checking(Recorder):
        async def deliver(self, node_id: str, delivery: Delivery) -> None:
            got = await receipts.get("t", delivery.notification.id)
            seen_at_delivery.append(None if got is None else got.delivered_to)
            await super().deliver(node_id, delivery)

    # "late" connects between the lookup the write is made with and the one that
    # decides the delivery: the receipt is written with 1, then recounted to 2.
    sessions = Sessions([{"on": ["n1"]}, {"on": ["n1"], "late": ["n3"]}], log)
    router = Router(load_settings(jwt_secret=TEST_JWT_SECRET), sessions,  # type: ignore[arg-type]
                    mailbox, Checking(log), receipts)
    n = Notification.create("t", "e", {}, default_ttl=60)
    skipped = Notification.create("t", "e", {}, default_ttl=60)
    target = Target("users", user_ids=("on", "late"))
    result = await router.route_many([(n, target), (skipped, target)], record={n.id})
    assert log[:3] == ["lookup", "committed", "lookup"]
    # Every delivery found the receipt already written (an ACK cannot beat it).
    assert seen_at_delivery and all(count is not None for count in seen_at_delivery[:2])
    assert result.reports[0].delivered_to == 2
    got = await receipts.get("t", n.id)
    assert got is not None and got.delivered_to == 2 and got.target == target
    # Only the notifications named in ``record`` get a receipt from the router.
    assert await receipts.get("t", skipped.id) is None
    # With Postgres away the receipts come back with the rows, for the retry.
    later = Notification.create("t", "e", {}, default_ttl=60)
    down = await router.route_many([(later, target)], mailbox_up=False, record={later.id})
    assert [r[0].id for r in down.unwritten_receipts] == [later.id]
    assert await receipts.get("t", later.id) is None


@dataclass
class PipelinedSessions(Sessions):
    """``Sessions`` that can also run delivery commands in its lookup's round trip."""

    ran: list[list[tuple[str, Delivery]]] = field(default_factory=list)

    async def sessions_with(
        self, by_tenant: dict[str, list[str]], commands: Sequence[Any]
    ) -> tuple[dict[tuple[str, str], list[SessionInfo]], list[Any]]:
        found = {(tenant, u): sessions for tenant, users in by_tenant.items()
                 for u, sessions in (await self.sessions_of(tenant, users)).items()}
        self.log.append(f"ahead {sorted(node for node, _ in commands)}")
        return found, [1 for _ in commands]


class CommandRecorder(Recorder):
    def commands(self, items: Sequence[tuple[str, Delivery]]) -> list[tuple[str, Delivery]]:
        return list(items)


async def test_router_sends_ahead_to_the_gateways_it_knew_and_follows_up_on_new_ones(
    pg: PostgresHandle,
) -> None:
    log: list[str] = []
    # Before the write "a" is on n1 and "b" on n2; after it "a" is on n1 and n4 and
    # "b" has left: n1 and n2 are sent to with the lookup, n4 once it has answered.
    sessions = PipelinedSessions([{"a": ["n1"], "b": ["n2"]}, {"a": ["n1", "n4"]}], log)
    delivery = CommandRecorder(log)
    router = Router(load_settings(jwt_secret=TEST_JWT_SECRET), sessions,  # type: ignore[arg-type]
                    LoggedMailbox(pg, log), delivery)
    n = Notification.create("t", "e", {}, default_ttl=60)
    report = await router.dispatch(n, Target("users", user_ids=("a", "b")))
    assert log[:4] == ["lookup", "committed", "lookup", "ahead ['n1', 'n2']"]
    # Only the gateway the lookup found and nobody had sent to is delivered to after.
    assert [node for node, _ in delivery.deliveries] == ["n4"]
    assert delivery.deliveries[0][1].user_ids == ("a",)
    assert report.delivered_to == 2 and report.users["b"].queued
