"""Postgres receipts: one send alone and many coalesced sends record the same thing.

A lone receipt is written with scalar parameters, concurrent ones share one
statement of arrays; both must give the same rows, recipients and updates. A
router records receipts in its mailbox write, and a cluster gateway answers for
one not routed yet from the record the send left in Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from common.backends.base import MailboxPut
from common.backends.postgres import PostgresHandle, PostgresMailbox, PostgresReceipts, migrate
from common.backends.redis_client import RedisHandle
from common.backends.redis_receipts import (
    ClusterReceipts,
    forget_pending_commands,
    pending_receipt_command,
)
from common.protocol import Notification, Target
from tests.cluster_harness import RedisServer, create_database, drop_database, pg_admin_dsn

pytestmark = pytest.mark.cluster


@pytest.fixture
async def receipts() -> AsyncIterator[PostgresReceipts]:
    admin = pg_admin_dsn()
    url = await create_database(admin)
    pg = PostgresHandle(url)
    try:
        await migrate(url)
        await pg.open()
        yield PostgresReceipts(pg)
    finally:
        await pg.close()
        await drop_database(admin, url)


def note(i: int) -> Notification:
    return Notification.create("t", "e", {"i": i}, default_ttl=3600)


async def test_a_lone_receipt_records_target_count_and_every_recipient(
    receipts: PostgresReceipts,
) -> None:
    n = note(1)
    await receipts.record(n, Target("users", user_ids=("a", "b", "a")), 2)
    got = await receipts.get("t", n.id)
    assert got is not None
    assert got.target == Target("users", user_ids=("a", "b", "a"))
    assert (got.delivered_to, got.event_type, got.created_at) == (2, "e", n.created_at)
    now = time.time()
    assert await receipts.ack("t", n.id, "b", "c1", now) == "acked"
    assert await receipts.ack("t", n.id, "z", "c2", now) == "not_yours"
    # recording it again updates the count and keeps the recipients
    await receipts.record(n, Target("users", user_ids=("a", "b")), 5)
    again = await receipts.get("t", n.id)
    assert again is not None and again.delivered_to == 5
    assert await receipts.ack("t", n.id, "a", "c3", now) == "acked"


async def test_coalesced_receipts_match_lone_ones(receipts: PostgresReceipts) -> None:
    notes = [note(i) for i in range(40)]
    targets = [Target("user", user_ids=(f"u{i}",)) if i % 3 else Target("channel", channels=("c",))
               for i in range(40)]
    # Submitted together: the first goes alone, the rest queue behind it and share statements.
    pairs = list(zip(notes, targets, strict=True))
    await asyncio.gather(*(receipts.record(n, t, i) for i, (n, t) in enumerate(pairs)))
    for i, (n, t) in enumerate(pairs):
        got = await receipts.get("t", n.id)
        assert got is not None and got.target == t and got.delivered_to == i
        if t.kind == "user":
            assert await receipts.ack("t", n.id, f"u{i}", "c", time.time()) == "acked"
            assert await receipts.ack("t", n.id, "other", "c", time.time()) == "not_yours"


async def test_a_mailbox_write_records_its_receipts_in_the_same_write(
    receipts: PostgresReceipts,
) -> None:
    box = PostgresMailbox(receipts.pg, 100)
    # Small writes are one INSERT with the receipts; large ones a COPY plus the receipts.
    for size in (1, PostgresMailbox.SMALL_WRITE + 10):
        notes = [note(i) for i in range(size)]
        puts = [MailboxPut(f"u{i}", n, i % 2 == 0) for i, n in enumerate(notes)]
        rows = [(n, Target("user", user_ids=(f"u{i}",)), i % 2) for i, n in enumerate(notes)]
        await box.put(puts, rows)
        # Routed again (a failover): existing rows are skipped, receipts updated.
        await box.put(puts, [(n, t, 7) for n, t, _ in rows])
        for i, n in enumerate(notes):
            got = await receipts.get("t", n.id)
            assert got is not None and got.delivered_to == 7
            assert got.target == Target("user", user_ids=(f"u{i}",))
            assert [e.notification.id for e in await box.pending("t", f"u{i}")][-1:] == [n.id]
            assert await receipts.ack("t", n.id, "stranger", "c", time.time()) == "not_yours"
    # Receipts alone (a channel batch has no mailbox rows).
    lone = note(99)
    await box.put([], [(lone, Target("channel", channels=("c",)), 3)])
    got = await receipts.get("t", lone.id)
    assert got is not None and got.delivered_to == 3
    await receipts.set_delivered([(lone.id, 4)])
    again = await receipts.get("t", lone.id)
    assert again is not None and again.delivered_to == 4


async def test_a_cluster_gateway_reads_a_receipt_not_yet_routed_from_its_pending_record(
    receipts: PostgresReceipts, redis_server: RedisServer,
) -> None:
    handle = RedisHandle(redis_server.url, "rcpt")
    try:
        view = ClusterReceipts(receipts, handle, 64)
        n = note(1)
        target = Target("users", user_ids=("a", "b"))
        await handle.execute([pending_receipt_command(handle.keys, 17, n, target)])
        got = await view.get("t", n.id)
        assert got is not None and got.target == target and got.delivered_to == 0
        assert got.created_at == n.created_at and got.expires_at == n.expires_at
        assert await view.get("other-tenant", n.id) is None
        # Once the router has recorded it, the row answers and the record can go.
        await PostgresMailbox(receipts.pg, 100).put([], [(n, target, 2)])
        await handle.execute(forget_pending_commands(handle.keys, [(17, [n.id])]))
        assert await handle.execute([("EXISTS", handle.keys.pending_receipt(17, n.id))]) == [0]
        stored = await view.get("t", n.id)
        assert stored is not None and stored.delivered_to == 2
        assert await view.get("t", note(2).id) is None
    finally:
        await handle.close()


async def test_ack_stats_count_each_recipient_once_whichever_schema_wrote_the_receipt(
    receipts: PostgresReceipts,
) -> None:
    now = time.time()
    lone, older, many = note(1), note(2), note(3)
    await receipts.record(lone, Target("user", user_ids=("a",)), 1)
    await receipts.record(older, Target("user", user_ids=("b",)), 1)
    # Before schema 3 a single-user receipt had its recipient row as well.
    await receipts.pg.execute(
        "INSERT INTO ara_receipt_users (notification_id, user_id) VALUES ($1, 'b')", older.id)
    await receipts.record(many, Target("users", user_ids=("c", "d")), 2)
    assert await receipts.pg.fetch(
        "SELECT 1 FROM ara_receipt_users WHERE notification_id = $1", lone.id) == []
    assert await receipts.ack("t", lone.id, "a", "c1", now) == "acked"
    assert await receipts.ack("t", older.id, "b", "c2", now) == "acked"
    assert await receipts.ack("t", many.id, "c", "c3", now) == "acked"
    assert await receipts.ack("t", lone.id, "b", "c4", now) == "not_yours"
    stats = await receipts.stats("t", now, 30)
    assert (stats.acknowledged, stats.pending) == (3, 1)


async def test_a_lone_row_and_receipt_write_the_same_as_a_batch_of_them(
    receipts: PostgresReceipts,
) -> None:
    box = PostgresMailbox(receipts.pg, 100)
    lone, channel, row_only = note(1), note(2), note(3)
    # One row with its receipt, a receipt alone, a row alone: the scalar statements.
    await box.put([MailboxPut("a", lone, True)], [(lone, Target("user", user_ids=("a",)), 1)])
    await box.put([], [(channel, Target("channel", channels=("c",)), 4)])
    await box.put([MailboxPut("a", row_only, False)])
    # Routed again: the row is skipped, the receipt's count updated.
    await box.put([MailboxPut("a", lone, True)], [(lone, Target("user", user_ids=("a",)), 2)])
    entries = await box.pending("t", "a")
    assert [(e.notification.id, e.delivered) for e in entries] == [
        (lone.id, True), (row_only.id, False)]
    got = await receipts.get("t", lone.id)
    assert got is not None and got.delivered_to == 2
    assert await receipts.ack("t", lone.id, "a", "c", time.time()) == "acked"
    assert await receipts.ack("t", lone.id, "b", "c", time.time()) == "not_yours"
    shared = await receipts.get("t", channel.id)
    assert shared is not None and shared.delivered_to == 4
    assert await receipts.get("t", row_only.id) is None
    # A few at once, one of them twice: rows in order, the receipt's last count wins.
    few = [note(10 + i) for i in range(3)]
    await box.put([MailboxPut("f", n, False) for n in (*few, few[0])],
                  [(n, Target("user", user_ids=("f",)), i) for i, n in enumerate(few)]
                  + [(few[0], Target("user", user_ids=("f",)), 9)])
    assert [e.notification.id for e in await box.pending("t", "f")] == [n.id for n in few]
    first = await receipts.get("t", few[0].id)
    assert first is not None and first.delivered_to == 9
