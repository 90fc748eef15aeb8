"""SQLite receipts of the embedded node: purged once past their retention.

A receipt goes, with its recipient and ACK rows, once its notification expired more
than ``RECEIPT_RETENTION_SECONDS`` ago; the embedded node's periodic purge does it,
after which the receipt answers 404 and the ACK statistics no longer count it.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiosqlite
import pytest
from conftest import ServerFactory

from common.backends.sqlite import SCHEMA, SQLiteDatabase, SQLiteMailbox, SQLiteReceipts
from common.protocol import Notification, Target

DAY = 86_400


@pytest.fixture
def database(sqlite_database: SQLiteDatabase) -> SQLiteDatabase:
    return sqlite_database


@pytest.fixture
def receipts(database: SQLiteDatabase) -> SQLiteReceipts:
    return SQLiteReceipts(database)


def aged(i: int, created_ago: float, ttl: int) -> Notification:
    """A notification created ``created_ago`` seconds ago that lives ``ttl`` seconds."""
    return Notification.create("t", "e", {"i": i}, default_ttl=ttl, now=time.time() - created_ago)


async def count(database: SQLiteDatabase, table: str, notification_id: str | None = None) -> int:
    if notification_id is None:
        cursor = await database.conn.execute(f"SELECT count(*) FROM {table}")
    else:
        cursor = await database.conn.execute(
            f"SELECT count(*) FROM {table} WHERE notification_id = ?", (notification_id,))
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_purge_deletes_receipts_expired_beyond_retention_with_their_users_and_acks(
    database: SQLiteDatabase, receipts: SQLiteReceipts,
) -> None:
    now, retention = time.time(), 600
    # Expired 950 s ago, beyond the retention, and ACKed.
    many, lone = aged(1, 1000, 50), aged(2, 1000, 50)
    await receipts.record(many, Target("users", user_ids=("a", "b")), 2)
    await receipts.record(lone, Target("user", user_ids=("c",)), 1)
    # Kept: expired 50 s ago (within the retention) and ACKed just now, and one still live.
    recent, live = aged(3, 100, 50), aged(4, 0, 3600)
    await receipts.record(recent, Target("users", user_ids=("a", "b")), 2)
    await receipts.record(live, Target("user", user_ids=("a",)), 1)
    for n, user in ((many, "a"), (lone, "c"), (recent, "b"), (live, "a")):
        assert await receipts.ack("t", n.id, user, "conn", n.created_at + 1) == "acked"

    assert await receipts.purge(now - retention) == 2

    for gone in (many, lone):
        assert await receipts.get("t", gone.id) is None
        assert await count(database, "receipt_users", gone.id) == 0
        assert await count(database, "acks", gone.id) == 0
        assert await receipts.ack("t", gone.id, "a", "conn", now) == "unknown"
    kept = await receipts.get("t", recent.id)
    assert kept is not None and [a[0] for a in kept.acked_by] == ["b"]
    assert await count(database, "receipt_users", recent.id) == 2
    still = await receipts.get("t", live.id)
    assert still is not None and len(still.acked_by) == 1
    assert await receipts.purge(now - retention) == 0


async def test_a_purge_of_more_receipts_than_one_batch_deletes_all_of_them(
    database: SQLiteDatabase, receipts: SQLiteReceipts,
) -> None:
    receipts.PURGE_BATCH = 7
    mailbox = SQLiteMailbox(database, 100)
    old = [aged(i, 3 * DAY, 60) for i in range(30)]
    fresh = [aged(100 + i, 0, 60) for i in range(3)]
    # Both ways receipts are written: with the mailbox rows and on their own.
    await mailbox.put([], [(n, Target("users", user_ids=("a", "b")), 1) for n in old[:20]])
    for n in [*old[20:], *fresh]:
        await receipts.record(n, Target("users", user_ids=("a", "b")), 1)
        assert await receipts.ack("t", n.id, "a", "conn", time.time()) == "acked"

    assert await receipts.purge(time.time() - DAY) == 30

    assert await count(database, "receipts") == 3
    assert await count(database, "receipt_users") == 6
    assert await count(database, "acks") == 3
    for n in fresh:
        assert await receipts.get("t", n.id) is not None


async def test_a_file_written_before_the_expiry_index_gets_it_when_opened(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "old.sqlite3")
    old_schema = SCHEMA.replace(
        "CREATE INDEX IF NOT EXISTS receipts_expiry ON receipts (expires_at);\n", "")
    assert old_schema != SCHEMA
    async with aiosqlite.connect(path) as conn:
        await conn.executescript(old_schema)
        await conn.commit()
    database = SQLiteDatabase(path)
    await database.open()
    try:
        cursor = await database.conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'receipts_expiry'")
        row = await cursor.fetchone()
        assert row is not None and "(expires_at)" in row[0]
    finally:
        await database.close()


async def test_the_embedded_node_purges_a_receipt_after_its_retention_and_get_says_404(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(receipt_retention_seconds=3600)
    short = await server.send_to_user("offline", ttl=1)
    long = await server.send_to_user("offline", ttl=7200)

    async def status(sent: dict[str, object]) -> int:
        return (await server.get(f"/api/v1/notifications/{sent['notification_id']}")).status_code

    assert (await status(short), await status(long)) == (200, 200)
    # Expired, but within the retention: kept.
    await server.node.purge(time.time() + 60)
    assert await status(short) == 200
    # Past the retention: gone, while the longer-lived one is still there.
    await server.node.purge(time.time() + 3600 + 60)
    missing = await server.get(f"/api/v1/notifications/{short['notification_id']}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOTIFICATION_NOT_FOUND"
    assert await status(long) == 200
    purged = server.node.metrics.registry.get_sample_value
    assert purged("ara_purged_total", {"store": "receipts"}) == 1
    # The short-lived one's queued row went at the first purge, when it expired.
    assert purged("ara_purged_total", {"store": "mailbox"}) == 1
