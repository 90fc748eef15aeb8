"""Postgres receipts: one send alone and many coalesced sends record the same thing.

A lone receipt is written with scalar parameters, concurrent ones share one
statement of arrays; both must give the same rows, recipients and updates. A
router records receipts in its mailbox write, and a cluster gateway answers for
one not routed yet from the record the send left in Redis.

Receipts are purged once their notification expired more than the retention ago,
with their recipient and ACK rows, in batches, by the router holding partition 0
only; schema version 4 adds the index the purge searches.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from common.backends import postgres
from common.backends.base import MailboxPut
from common.backends.postgres import PostgresHandle, PostgresMailbox, PostgresReceipts, migrate
from common.backends.redis_client import RedisHandle
from common.backends.redis_receipts import (
    ClusterReceipts,
    forget_pending_commands,
    pending_receipt_command,
)
from common.protocol import Notification, Target
from gateway.cluster import cluster_backends
from tests.cluster_harness import (
    RedisServer,
    create_database,
    drop_database,
    pg_admin_dsn,
    router_in_process,
)
from tests.conftest import EmbeddedServer, make_settings

pytestmark = pytest.mark.cluster


@pytest.fixture
def receipts(pg_receipts: PostgresReceipts) -> PostgresReceipts:
    return pg_receipts


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


# -- purge ---------------------------------------------------------------------------

DAY = 86_400


def aged(i: int, created_ago: float, ttl: int, tenant: str = "t") -> Notification:
    """A notification created ``created_ago`` seconds ago that lives ``ttl`` seconds."""
    return Notification.create(tenant, "e", {"i": i}, default_ttl=ttl,
                               now=time.time() - created_ago)


async def rows_of(pg: PostgresHandle, table: str, notification_id: str) -> int:
    return len(await pg.fetch(
        f"SELECT 1 FROM {table} WHERE notification_id = $1", notification_id))


async def test_purge_deletes_receipts_expired_beyond_retention_with_their_users_and_acks(
    receipts: PostgresReceipts,
) -> None:
    now, retention = time.time(), 600
    pg = receipts.pg
    # Expired 950 s ago, beyond the retention: a multi-user one, a single-user one, and a
    # single-user one written before schema 3 (with its recipient row), all ACKed.
    many, lone, legacy = aged(1, 1000, 50), aged(2, 1000, 50), aged(3, 1000, 50)
    await receipts.record(many, Target("users", user_ids=("a", "b")), 2)
    await receipts.record(lone, Target("user", user_ids=("c",)), 1)
    await receipts.record(legacy, Target("user", user_ids=("d",)), 1)
    await pg.execute("INSERT INTO ara_receipt_users VALUES ($1, 'd')", legacy.id)
    # Kept: expired 50 s ago (within the retention) and ACKed just now, and one still live.
    recent, live = aged(4, 100, 50), aged(5, 0, 3600)
    await receipts.record(recent, Target("users", user_ids=("a", "b")), 2)
    await receipts.record(live, Target("user", user_ids=("a",)), 1)
    for n, user in ((many, "a"), (lone, "c"), (legacy, "d"), (recent, "b"), (live, "a")):
        assert await receipts.ack("t", n.id, user, "conn", n.created_at + 1) == "acked"

    assert await receipts.purge(now - retention) == 3

    for gone in (many, lone, legacy):
        assert await receipts.get("t", gone.id) is None
        assert await rows_of(pg, "ara_receipt_users", gone.id) == 0
        assert await rows_of(pg, "ara_acks", gone.id) == 0
        assert await receipts.ack("t", gone.id, "a", "conn", now) == "unknown"
    kept = await receipts.get("t", recent.id)
    assert kept is not None and [a[0] for a in kept.acked_by] == ["b"]
    assert await rows_of(pg, "ara_receipt_users", recent.id) == 2
    assert await receipts.ack("t", recent.id, "a", "conn", now) == "acked"
    still = await receipts.get("t", live.id)
    assert still is not None and len(still.acked_by) == 1
    # Nothing left to purge: a second run deletes nothing.
    assert await receipts.purge(now - retention) == 0


async def test_a_purge_of_more_receipts_than_one_batch_deletes_all_of_them(
    receipts: PostgresReceipts,
) -> None:
    receipts.PURGE_BATCH = 7
    box = PostgresMailbox(receipts.pg, 100)
    old = [aged(i, 3 * DAY, 60) for i in range(30)]
    fresh = [aged(100 + i, 0, 60) for i in range(3)]
    # Both ways receipts are written: with a router's mailbox write and by a gateway.
    await box.put([], [(n, Target("users", user_ids=("a", "b")), 1) for n in old[:20]])
    for n in [*old[20:], *fresh]:
        await receipts.record(n, Target("users", user_ids=("a", "b")), 1)
        assert await receipts.ack("t", n.id, "a", "conn", time.time()) == "acked"

    assert await receipts.purge(time.time() - DAY) == 30

    left = await receipts.pg.fetch("SELECT notification_id FROM ara_receipts")
    assert sorted(r["notification_id"] for r in left) == sorted(n.id for n in fresh)
    users = await receipts.pg.fetch("SELECT DISTINCT notification_id FROM ara_receipt_users")
    acks = await receipts.pg.fetch("SELECT DISTINCT notification_id FROM ara_acks")
    assert {r["notification_id"] for r in users} == {n.id for n in fresh}
    assert {r["notification_id"] for r in acks} == {n.id for n in fresh}


async def test_migration_4_adds_the_expiry_index_to_a_database_at_schema_3(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin = pg_admin_dsn()
    url = await create_database(admin)
    pg = PostgresHandle(url)
    try:
        with monkeypatch.context() as m:  # what an older release migrated to
            m.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:3])
            assert await migrate(url) == 3
        await pg.open()
        store = PostgresReceipts(pg)
        old, live = aged(1, 3 * DAY, 60), aged(2, 0, 3600)
        for n in (old, live):
            await store.record(n, Target("users", user_ids=("a", "b")), 1)

        assert await migrate(url) == 4
        assert await migrate(url) == 4  # and again: nothing more to do

        versions = await pg.fetch("SELECT version FROM ara_schema_version ORDER BY version")
        assert [r["version"] for r in versions] == [1, 2, 3, 4]
        index = await pg.fetchrow(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ara_receipts_expiry_brin'")
        assert index is not None
        assert "USING brin (expires_at)" in index["indexdef"]
        assert await store.purge(time.time() - DAY) == 1
        assert await store.get("t", old.id) is None
        assert await store.get("t", live.id) is not None
    finally:
        await pg.close()
        await drop_database(admin, url)


async def test_a_role_that_does_not_own_the_index_still_purges_and_warns_once(
    receipts: PostgresReceipts, caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = receipts.pg.dsn
    role = f"ara_test_dml_{uuid.uuid4().hex[:8]}"
    owner = await asyncpg.connect(dsn)
    await owner.execute(f"CREATE ROLE {role} LOGIN")
    await owner.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ara_receipts,"
                        f" ara_receipt_users, ara_acks TO {role}")
    base, database = dsn.rsplit("/", 1)
    scheme, rest = base.split("://", 1)
    host = rest.rsplit("@", 1)[-1]
    handle = PostgresHandle(f"{scheme}://{role}@{host}/{database}")
    try:
        await handle.open()
        limited = PostgresReceipts(handle)
        for i in range(3):
            await receipts.record(aged(i, 3 * DAY, 60), Target("users", user_ids=("a",)), 1)
        with caplog.at_level(logging.WARNING, logger="ara.postgres"):
            assert await limited.purge(time.time() - DAY) == 3
            await receipts.record(aged(9, 3 * DAY, 60), Target("users", user_ids=("a",)), 1)
            assert await limited.purge(time.time() - DAY) == 1
        warnings = [r for r in caplog.records if "ara_receipts_expiry_brin" in r.getMessage()]
        assert len(warnings) == 1
        # The owner's purges keep the index maintained.
        assert await receipts.purge(time.time() - DAY) == 0
        assert receipts._summarize
    finally:
        await handle.close()
        await owner.execute(f"DROP OWNED BY {role}")
        await owner.execute(f"DROP ROLE {role}")
        await owner.close()


async def test_a_purge_does_not_wait_for_a_vacuum_that_holds_the_table(
    receipts: PostgresReceipts,
) -> None:
    for i in range(3):
        await receipts.record(aged(i, 3 * DAY, 60), Target("users", user_ids=("a",)), 1)
    vacuum = await asyncpg.connect(receipts.pg.dsn)
    try:
        # What (auto)vacuum and ANALYZE hold while they work, and index upkeep needs.
        async with vacuum.transaction():
            await vacuum.execute("LOCK TABLE ara_receipts IN SHARE UPDATE EXCLUSIVE MODE")
            assert await asyncio.wait_for(receipts.purge(time.time() - DAY), 5) == 3
            assert receipts._unsummarized  # left for later
        await receipts.record(aged(9, 3 * DAY, 60), Target("users", user_ids=("a",)), 1)
        assert await asyncio.wait_for(receipts.purge(time.time() - DAY), 5) == 1
        assert not receipts._unsummarized and receipts._summarize
    finally:
        await vacuum.close()


async def test_in_a_cluster_only_the_router_holding_partition_0_purges_and_counts_the_queue(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    async with router_in_process(redis_server.url, "r-purge", "purge") as (router, dsn):
        settings = make_settings(tmp_path, redis_url=redis_server.url, database_url=dsn,
                                 node_id="gw-purge", redis_key_prefix="purge")
        gateway = EmbeddedServer(settings, backends=cluster_backends)
        await router.pg.open()
        await gateway.start()
        try:
            # The gateways run no purge of their own (every one of them used to repeat
            # the same deletes and a full count of the mailbox every minute).
            assert not gateway.node.backends.janitor
            old = aged(1, 3 * DAY, 60, tenant="default")
            live = aged(2, 0, 3600, tenant="default")
            for n in (old, live):
                await router.receipts.record(n, Target("user", user_ids=("u",)), 1)
            await router.mailbox.put([MailboxPut("u", old, False), MailboxPut("u", live, False),
                                      MailboxPut("v", live, False)], [])

            async def status(n: Notification) -> int:
                return (await gateway.get(f"/api/v1/notifications/{n.id}")).status_code

            def depth() -> float | None:
                return router.metrics.registry.get_sample_value("ara_queue_depth")

            assert (await status(old), await status(live)) == (200, 200)
            router.metrics.queue_depth.set(7)  # as a router that lost partition 0 left it
            await router._sweep()  # a router without partition 0 purges nothing
            assert await status(old) == 200
            assert depth() == 0
            assert await router.mailbox.depth() == 3
            assert await router.leases.acquire([0]) == [0]
            await router._sweep()
            missing = await gateway.get(f"/api/v1/notifications/{old.id}")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "NOTIFICATION_NOT_FOUND"
            assert await status(live) == 200
            assert depth() == 2  # the expired row went
            purged = router.metrics.registry.get_sample_value
            assert purged("ara_purged_total", {"store": "mailbox"}) == 1
            assert purged("ara_purged_total", {"store": "receipts"}) == 1
        finally:
            await gateway.stop()
            await router.leases.release([0])
            await router.pg.close()
