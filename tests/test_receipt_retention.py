"""What every receipt store promises about its purge, checked on Postgres and SQLite alike.

Store-specific behaviour (batches, indexes, migrations, who runs the purge) is pinned in
``test_receipts_postgres.py`` and ``test_receipts_sqlite.py``.
"""

from __future__ import annotations

import time

import pytest

from common.backends.base import ReceiptStore
from common.backends.sqlite import SQLiteDatabase, SQLiteReceipts
from common.protocol import Notification, Target

DAY = 86_400


@pytest.fixture
def sqlite_receipts(sqlite_database: SQLiteDatabase) -> SQLiteReceipts:
    return SQLiteReceipts(sqlite_database)


@pytest.fixture(params=["pg_receipts", "sqlite_receipts"])
def store(request: pytest.FixtureRequest) -> ReceiptStore:
    store: ReceiptStore = request.getfixturevalue(request.param)
    return store


def aged(i: int, created_ago: float, ttl: int) -> Notification:
    """A notification created ``created_ago`` seconds ago that lives ``ttl`` seconds."""
    return Notification.create("t", "e", {"i": i}, default_ttl=ttl, now=time.time() - created_ago)


async def test_ack_stats_no_longer_count_purged_receipts(store: ReceiptStore) -> None:
    old, live = aged(1, 3 * DAY, 60), aged(2, 0, 3600)
    for n in (old, live):
        await store.record(n, Target("users", user_ids=("a", "b")), 2)
        assert await store.ack("t", n.id, "a", "conn", n.created_at + 0.5) == "acked"
    before = await store.stats("t", time.time(), 30)
    assert (before.acknowledged, before.pending + before.expired) == (2, 2)

    assert await store.purge(time.time() - DAY) == 1

    after = await store.stats("t", time.time(), 30)
    assert (after.acknowledged, after.pending, after.expired) == (1, 1, 0)
    assert after.average_ack_time_ms == pytest.approx(500, abs=1)
    assert await store.get("t", old.id) is None
    assert await store.get("t", live.id) is not None
