"""Postgres receipts: one send alone and many coalesced sends record the same thing.

A lone receipt is written with scalar parameters, concurrent ones share one
statement of arrays; both must give the same rows, recipients and updates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from common.backends.postgres import PostgresHandle, PostgresReceipts, migrate
from common.protocol import Notification, Target
from tests.cluster_harness import create_database, drop_database, pg_admin_dsn

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
