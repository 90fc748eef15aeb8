"""Postgres backends of the cluster: mailbox, receipts, templates, and the schema.

Writes are batched: one statement per call (a ``COPY`` for mailbox rows, an
``INSERT ... SELECT FROM unnest(...)`` elsewhere), however many users a
notification or a router batch touches. The per-user
bound (keep the newest ``QUEUE_MAX_SIZE_PER_USER``) is applied by every read
and before every delete, and trimmed in bulk by the periodic purge, not on the
write path (see ``PostgresMailbox``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import asyncpg

from common import jsoncodec
from common.backends.base import (
    AckResult,
    AckStats,
    MailboxEntry,
    MailboxPut,
    Receipt,
    ReceiptRow,
    Template,
    decode_template,
    encode_template,
)
from common.errors import BackendUnavailable
from common.protocol import Notification, Target

log = logging.getLogger("ara.postgres")

SCHEMA_VERSION = 4
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS ara_mailbox (
        seq BIGSERIAL PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        notification_id TEXT NOT NULL,
        record BYTEA NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        delivered BOOLEAN NOT NULL DEFAULT FALSE,
        UNIQUE (tenant_id, user_id, notification_id)
    );
    CREATE INDEX IF NOT EXISTS ara_mailbox_user ON ara_mailbox (tenant_id, user_id, seq);
    CREATE INDEX IF NOT EXISTS ara_mailbox_expiry ON ara_mailbox (expires_at);
    CREATE TABLE IF NOT EXISTS ara_receipts (
        notification_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        target JSONB NOT NULL,
        event_type TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        delivered_to INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS ara_receipts_tenant ON ara_receipts (tenant_id, created_at);
    CREATE INDEX IF NOT EXISTS ara_receipts_expiry ON ara_receipts (expires_at);
    CREATE TABLE IF NOT EXISTS ara_receipt_users (
        notification_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        PRIMARY KEY (notification_id, user_id)
    );
    CREATE TABLE IF NOT EXISTS ara_acks (
        notification_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        connection_id TEXT NOT NULL,
        acked_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (notification_id, user_id)
    );
    CREATE TABLE IF NOT EXISTS ara_templates (
        tenant_id TEXT NOT NULL,
        id TEXT NOT NULL,
        body JSONB NOT NULL,
        PRIMARY KEY (tenant_id, id)
    );
    """,
    # 2: the per-user bound moves from every write to reads, deletes and the purge
    # (``PostgresMailbox``). One row: the highest ``seq`` whose users a purge has
    # trimmed, shared by every process that purges. Rows written by versions before
    # this one were trimmed on write, so it starts at the current highest ``seq``.
    """
    CREATE TABLE IF NOT EXISTS ara_mailbox_trim (
        id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
        upto BIGINT NOT NULL
    );
    INSERT INTO ara_mailbox_trim (id, upto)
    SELECT TRUE, coalesce(max(seq), 0) FROM ara_mailbox
    ON CONFLICT DO NOTHING;
    """,
    # 3: receipts are written by the routers with every routed batch (``receipt_ctes``),
    # so they carry no index that no query uses: the tenant index served nothing (the
    # stats query's tenant filter is optional and joins by id), and nothing deletes
    # receipts by expiry. A single-user target's recipient is its ``target``
    # (``RECIPIENTS``), not an ``ara_receipt_users`` row.
    """
    DROP INDEX IF EXISTS ara_receipts_tenant;
    DROP INDEX IF EXISTS ara_receipts_expiry;
    """,
    # 4: receipts are purged by expiry (``PostgresReceipts.purge``), which needs an index on
    # ``expires_at`` not to read the whole table each time. A BRIN index, not the btree
    # version 3 dropped: receipts are inserted at the routers' full rate and a btree costs
    # an index insertion per row, while a BRIN one stores a min/max per range of
    # ``RECEIPT_BRIN_PAGES`` heap pages and is updated in place, almost for free; rows
    # arrive in creation order, so each range's expiries are close together. A range is
    # only summarized once it is full (``autosummarize`` asks autovacuum to do it then,
    # the purge does it too) and never narrows again once its rows are deleted and the
    # space reused: the purge re-summarizes the ranges it deleted from (``_maintain_index``).
    # Building it reads the table once, holding back receipt writes for that long.
    """
    CREATE INDEX IF NOT EXISTS ara_receipts_expiry_brin ON ara_receipts
        USING brin (expires_at) WITH (pages_per_range = 32, autosummarize = on);
    """,
]
# ``pages_per_range`` of migration 4's index.
RECEIPT_BRIN_PAGES = 32

# The (notification, user) pairs a receipt was sent to: ``ara_receipt_users`` rows for
# several users, the target itself for one (its row would double the receipt's cost).
# UNION, not UNION ALL: receipts written before schema 3 have both.
RECIPIENTS = """
    SELECT notification_id, user_id FROM ara_receipt_users
    UNION
    SELECT notification_id, target->>'value' FROM ara_receipts WHERE target->>'type' = 'user'
"""


async def migrate(dsn: str) -> int:
    """Apply the schema; safe to run concurrently and repeatedly. Returns the version."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SELECT pg_advisory_lock(727274)")
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS ara_schema_version (version INTEGER NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM ara_schema_version"
            )
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO ara_schema_version (version) VALUES ($1)", version
                    )
                log.info("applied schema version %d", version)
            return len(MIGRATIONS)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(727274)")
    finally:
        await conn.close()


PG_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
)


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Pool ``reset`` hook: nothing to undo.

    asyncpg's default runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release, one extra round trip per query through the pool.
    The stores never leave session state behind (no ``SET``, ``LISTEN``, cursors or
    advisory locks; ``migrate`` uses its own connection), and asyncpg still rolls
    back any open transaction before calling this.
    """


class PostgresHandle:
    """The asyncpg pool shared by the Postgres stores."""

    # Connections kept out of the pool between statements (see ``_connection``).
    HELD_CONNECTIONS = 2

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._held: list[Any] = []

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=self.min_size, max_size=self.max_size, timeout=5,
            command_timeout=10, reset=_no_session_reset,
        )

    async def close(self) -> None:
        if self._pool is not None:
            held, self._held = self._held, []
            for conn in held:
                with contextlib.suppress(Exception):
                    await self._pool.release(conn)
            await self._pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pool connection for one statement, kept for the next instead of released.

        A checkout from asyncpg's pool costs ~65 µs of CPU (its release runs in a task
        of its own under ``shield``), more than a small statement itself (30 µs for
        ``SELECT 1`` on a kept connection, 106 µs through the pool); the mailbox and
        receipt writes run on every batch and every send. Up to ``HELD_CONNECTIONS``
        are kept; a statement that fails in any way hands its connection back to the
        pool, which resets or replaces it.
        """
        pool = self.pool
        conn = self._held.pop() if self._held else await pool.acquire()
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):
                await pool.release(conn)
            raise
        if len(self._held) < self.HELD_CONNECTIONS and self._pool is pool and not conn.is_closed():
            self._held.append(conn)
        else:
            await pool.release(conn)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise BackendUnavailable("postgres", "postgres pool is not open")
        return self._pool

    async def ping(self) -> dict[str, Any]:
        started = time.monotonic()
        async with self.pool.acquire(timeout=1.5) as conn:
            await conn.fetchval("SELECT 1")
        return {"status": "up", "latency_ms": round((time.monotonic() - started) * 1000, 2)}

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with self._connection() as conn:
                return list(await conn.fetch(sql, *args))
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc

    async def execute(self, sql: str, *args: Any) -> str:
        try:
            async with self._connection() as conn:
                return str(await conn.execute(sql, *args))
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            async with self._connection() as conn:
                row: asyncpg.Record | None = await conn.fetchrow(sql, *args)
                return row
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc

    async def copy_records(
        self, table: str, columns: Sequence[str], records: Sequence[tuple[Any, ...]]
    ) -> None:
        """``COPY ... FROM STDIN (FORMAT binary)``: the cheapest bulk insert, on both
        sides (about half the client CPU per row of an ``unnest`` insert here)."""
        await self.copy_records_together([(table, columns, records)])

    async def copy_records_together(
        self, copies: Sequence[tuple[str, Sequence[str], Sequence[tuple[Any, ...]]]]
    ) -> None:
        """Several ``COPY``s (table, columns, records) in one transaction: one commit."""
        try:
            async with self._connection() as conn:
                if len(copies) == 1:
                    table, columns, records = copies[0]
                    await conn.copy_records_to_table(table, records=records,
                                                     columns=list(columns))
                    return
                async with conn.transaction():
                    for table, columns, records in copies:
                        await conn.copy_records_to_table(table, records=records,
                                                         columns=list(columns))
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc


def _count(status: str) -> int:
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


T = TypeVar("T")


class Coalescer(Generic[T]):
    """Group commit: items submitted while writes are running go out together next.

    ``submit`` returns once the write that carried its items has finished (or
    raises what it raised). At most ``parallel`` writes are in flight, so under
    load the batches grow instead of the round trips multiplying. Items of one
    ``submit`` stay together and in order; a caller that needs its writes ordered
    waits for one before submitting the next (the router does, per partition).

    A submit that finds nothing in flight and nothing waiting writes at once in
    its caller's task (below a few hundred writes a second that is every write,
    and a task per write cost ~4 % of a REST send's instructions); the others
    are written by tasks of their own. A cancelled caller can therefore abandon
    its own write, never anyone else's.
    """

    def __init__(
        self, write: Callable[[list[T]], Awaitable[None]], max_items: int, parallel: int = 2
    ) -> None:
        self._write = write
        self._max_items = max_items
        self._parallel = parallel
        self._queue: list[tuple[Sequence[T], asyncio.Future[None]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, items: Sequence[T]) -> None:
        if not self._running and not self._queue:
            self._running += 1
            try:
                await self._write(list(items))
            finally:
                self._running -= 1
                self._start_writers()
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((items, done))
        self._start_writers()
        await done

    def _start_writers(self) -> None:
        """Writer tasks for what waits, up to ``parallel`` writes in flight."""
        loop = asyncio.get_running_loop()
        while self._queue and self._running < self._parallel:
            self._running += 1
            task = loop.create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[Sequence[T], asyncio.Future[None]]]:
        taken: list[tuple[Sequence[T], asyncio.Future[None]]] = []
        size = 0
        while self._queue and (not taken or size + len(self._queue[0][0]) <= self._max_items):
            entry = self._queue.pop(0)
            taken.append(entry)
            size += len(entry[0])
        return taken

    async def _run(self) -> None:
        try:
            while self._queue:
                taken = self._take()
                try:
                    await self._write([item for chunk, _ in taken for item in chunk])
                except BaseException as exc:  # hand every caller the failure
                    for _, done in taken:
                        if not done.done():
                            done.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                else:
                    for _, done in taken:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._running -= 1
            if self._running == 0:
                for _, done in self._queue:  # only left behind if we were cancelled
                    if not done.done():
                        done.set_exception(
                            BackendUnavailable("postgres", "mailbox writer stopped"))
                self._queue.clear()


class PostgresMailbox:
    """``Mailbox`` on Postgres, written in batches by the routers.

    ``put`` and ``mark_delivered`` go through a ``Coalescer``: a router routes its
    partitions concurrently, and their writes share one statement per round trip.

    **The per-user bound is applied when rows are read or deleted, not when they
    are written.** Trimming on every write cost an index walk per user per batch:
    that write ran at ~20k rows/s here, a plain ``COPY`` of the same rows at ~45k.
    What callers observe is still the bound of a trim-on-write mailbox:

    - every read (``pending``, ``depth``) sees only each user's newest
      ``max_per_user`` rows by ``seq``;
    - every statement that deletes a user's rows (``ack``, ``remove``,
      ``purge_expired``) first deletes that user's rows beyond the bound, in the same
      statement (one snapshot).

    Between two deletions a user's rows only grow, and the newest ``max_per_user``
    of a growing set do not depend on when older rows were cut; so before each
    deletion the visible rows are exactly those a trim on every write would have
    kept, and the deletion leaves the same rows behind. Without the cut-first rule an
    ACK of a visible row would let an older, already-bounded-away row reappear.

    Rows beyond the bound are also removed in bulk by ``purge_expired`` (the router
    holding partition 0 runs it every 30 s, gateways every minute): it trims the
    users written since the previous purge of *any* process, found from the
    ``ara_mailbox_trim`` mark, so storage stays bounded by what arrives between
    purges. A user it misses (see ``TRIM_SLACK``) only keeps rows nobody can read
    until that user's next write, ACK or expiry.
    """

    MAX_BATCH = 5000
    SMALL_WRITE = 64
    # A purge trims the users of rows above ``ara_mailbox_trim.upto`` minus this
    # much. ``seq`` values are drawn when a row is inserted and become visible at
    # commit, so a write still in flight during the previous purge can commit rows
    # below the mark that purge left; this catches a batch or two of those.
    TRIM_SLACK = 2 * MAX_BATCH

    def __init__(self, pg: PostgresHandle, max_per_user: int) -> None:
        self.pg = pg
        self.max_per_user = max_per_user
        self.dropped = 0
        self._puts: Coalescer[MailboxPut | ReceiptRow] = Coalescer(self._put, self.MAX_BATCH)
        self._marks: Coalescer[tuple[str, str, str]] = Coalescer(
            self._mark_delivered, self.MAX_BATCH
        )

    async def put(
        self, items: Sequence[MailboxPut], receipts: Sequence[ReceiptRow] = ()
    ) -> None:
        if items or receipts:
            await self._puts.submit([*items, *receipts])

    async def _put(self, writes: list[MailboxPut | ReceiptRow]) -> None:
        """Insert in order, with the receipts; the bound is applied by readers (see the
        class docstring).

        A user with more than ``max_per_user`` items in the batch only gets the newest
        ones inserted: the others could never be read, so they are not written.

        A write of up to ``SMALL_WRITE`` rows and receipts (every batch below a few
        thousand notifications a second) is one ``INSERT ... ON CONFLICT DO NOTHING``
        that records the receipts in the same statement: one round trip, where a
        ``COPY`` takes two (its start, then the data). A larger one goes in with
        ``COPY``s straight into the three tables, in one transaction, which has no
        ``ON CONFLICT``: a row that is already there (an entry routed a second time,
        after a router failed over or an acknowledgement failed) makes it fail and
        roll back, and then the batch is written again with the ``INSERT``, which
        skips the rows and updates the receipts. That is
        rare, and cheaper than paying a staging table or the ``unnest`` encoding on
        every large batch (the router's throughput halved with the receipts
        inserted that way).
        """
        items = [w for w in writes if isinstance(w, MailboxPut)]
        receipts = [w for w in writes if not isinstance(w, MailboxPut)]
        per_user = Counter((i.notification.tenant_id, i.user_id) for i in items)
        if any(n > self.max_per_user for n in per_user.values()):
            keep: Counter[tuple[str, str]] = Counter()
            newest_first = []
            for item in reversed(items):
                key = (item.notification.tenant_id, item.user_id)
                if keep[key] < self.max_per_user:
                    keep[key] += 1
                    newest_first.append(item)
            self.dropped += len(items) - len(newest_first)
            items = newest_first[::-1]
        rows = [
            (n.tenant_id, i.user_id, n.id, n.record_json(), n.expires_at, i.delivered)
            for i in items
            for n in (i.notification,)
        ]
        if len(rows) + len(receipts) <= self.SMALL_WRITE:
            await self._insert(rows, receipts)
            return
        copies: list[tuple[str, Sequence[str], list[tuple[Any, ...]]]] = [
            ("ara_mailbox", self._COLUMNS, rows),
            ("ara_receipts", RECEIPT_COLUMNS, receipt_records(receipts)),
            ("ara_receipt_users", ("notification_id", "user_id"), receipt_user_pairs(receipts)),
        ]
        try:
            await self.pg.copy_records_together([c for c in copies if c[2]])
        except asyncpg.exceptions.UniqueViolationError:
            await self._insert(rows, receipts)

    _COLUMNS = ("tenant_id", "user_id", "notification_id", "record", "expires_at", "delivered")

    async def _insert(self, rows: list[tuple[Any, ...]], receipts: Sequence[ReceiptRow]) -> None:
        """Mailbox rows in order (existing ones skipped) and receipts, one statement."""
        if (len(rows) <= FEW and len(receipts) <= FEW
                and all(t.kind != "users" for _, t, _ in receipts)):  # no receipt user rows
            await self._insert_few(rows, receipts)
            return
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in self._COLUMNS]
        await self.pg.execute(
            f"""
            WITH {receipt_ctes(7)}
            INSERT INTO ara_mailbox
                (tenant_id, user_id, notification_id, record, expires_at, delivered)
            SELECT tenant_id, user_id, notification_id, record, expires_at, delivered
            FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::float8[],
                        $6::bool[])
                WITH ORDINALITY AS t(tenant_id, user_id, notification_id, record,
                                     expires_at, delivered, ord)
            ORDER BY ord
            ON CONFLICT DO NOTHING
            """,
            *(list(c) for c in columns), *receipt_arrays(receipts),
        )

    async def _insert_few(
        self, rows: list[tuple[Any, ...]], receipts: Sequence[ReceiptRow]
    ) -> None:
        """A few rows and receipts without user rows (a routed batch at low rates), with
        scalar parameters: asyncpg's array encoding cost ~40 ``isinstance`` checks per
        array, and the array statement has fifteen."""
        if not rows and not receipts:
            return
        records = receipt_records(receipts)
        await self.pg.execute(few_sql(len(records), len(rows)),
                              *(v for record in records for v in record),
                              *(v for row in rows for v in row))

    async def pending(self, tenant_id: str, user_id: str) -> list[MailboxEntry]:
        """The user's unexpired rows among its newest ``max_per_user``, oldest first."""
        rows = await self.pg.fetch(
            "SELECT record, delivered FROM ("
            " SELECT seq, record, delivered, expires_at FROM ara_mailbox"
            " WHERE tenant_id = $1 AND user_id = $2 ORDER BY seq DESC LIMIT $4"
            ") newest WHERE expires_at > $3 ORDER BY seq",
            tenant_id, user_id, time.time(), self.max_per_user,
        )
        return [
            MailboxEntry(Notification.from_record(jsoncodec.loads(r["record"])), r["delivered"])
            for r in rows
        ]

    async def mark_delivered(self, tenant_id: str, pairs: Sequence[tuple[str, str]]) -> None:
        if pairs:
            await self._marks.submit([(tenant_id, user, nid) for user, nid in pairs])

    async def _mark_delivered(self, rows: list[tuple[str, str, str]]) -> None:
        await self.pg.execute(
            "UPDATE ara_mailbox m SET delivered = TRUE"
            " FROM unnest($1::text[], $2::text[], $3::text[])"
            " AS k(tenant_id, user_id, notification_id)"
            " WHERE m.tenant_id = k.tenant_id AND m.user_id = k.user_id"
            " AND m.notification_id = k.notification_id AND NOT m.delivered",
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
        )

    # One user's rows beyond the bound, then the named ones among the rest: both
    # sets come from the statement's one snapshot (see the class docstring).
    _DELETE_SQL = """
        WITH cut AS (
            SELECT seq FROM ara_mailbox WHERE tenant_id = $1 AND user_id = $2
            ORDER BY seq DESC OFFSET $4 LIMIT 1
        ), gone AS (
            DELETE FROM ara_mailbox
            WHERE tenant_id = $1 AND user_id = $2
              AND (notification_id = ANY($3::text[]) OR seq <= (SELECT seq FROM cut))
            RETURNING seq > coalesce((SELECT seq FROM cut), 0) AS visible
        )
        SELECT count(*) FILTER (WHERE visible) AS removed,
               count(*) FILTER (WHERE NOT visible) AS trimmed
        FROM gone
    """

    async def _delete(self, tenant_id: str, user_id: str, ids: list[str]) -> int:
        """Delete ``ids`` of one user, bound first; returns how many were visible."""
        row = await self.pg.fetchrow(
            self._DELETE_SQL, tenant_id, user_id, ids, self.max_per_user
        )
        if row is None:
            return 0
        self.dropped += int(row["trimmed"])
        return int(row["removed"])

    async def remove(self, tenant_id: str, user_id: str, ids: Sequence[str]) -> None:
        if ids:
            await self._delete(tenant_id, user_id, list(ids))

    async def ack(self, tenant_id: str, user_id: str, notification_id: str) -> bool:
        """True if the row was there to remove (within the bound, like a trimmed mailbox)."""
        return await self._delete(tenant_id, user_id, [notification_id]) > 0

    async def purge_expired(self, now: float) -> int:
        """Delete expired rows and the rows beyond each user's bound.

        Returns the number of expired rows within the bound, the ones a mailbox
        trimmed on write would have had to purge; the others count as ``dropped``.

        Users are cut first wherever rows are deleted (the class docstring says why):
        here those with a row written since the previous purge, and those with an
        expired row. Expired rows are found through the ``expires_at`` index and
        recent writers through the ``seq`` primary key, so neither scans the table.
        Purges of several processes do not overlap: the one that finds the
        ``ara_mailbox_trim`` row locked leaves the work to the one holding it.
        """
        try:
            async with self.pg.pool.acquire() as conn, conn.transaction():
                upto = await conn.fetchval(
                    "SELECT upto FROM ara_mailbox_trim FOR UPDATE SKIP LOCKED")
                if upto is None:
                    if await conn.fetchval("SELECT count(*) FROM ara_mailbox_trim"):
                        return 0  # another purge holds it
                    # The row is gone (it is only ever updated): start over from 0
                    # rather than leave expired rows in place for good.
                    await conn.execute(
                        "INSERT INTO ara_mailbox_trim (id, upto) VALUES (TRUE, 0)"
                        " ON CONFLICT DO NOTHING")
                    upto = 0
                # The per-user probes make the planner's estimate large enough for JIT,
                # whose compilation took ~0.5 s of a ~0.75 s purge of 100k fresh rows.
                await conn.execute("SET LOCAL jit = off")
                row = await conn.fetchrow(
                    self._PURGE_SQL, max(0, upto - self.TRIM_SLACK), now, self.max_per_user)
                assert row is not None
                await conn.execute(
                    "UPDATE ara_mailbox_trim SET upto = greatest(upto, $1)", row["high"])
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc
        self.dropped += int(row["trimmed"])
        return int(row["expired"])

    _PURGE_SQL = """
        WITH users AS (
            SELECT DISTINCT tenant_id, user_id FROM ara_mailbox
            WHERE seq > $1 OR expires_at <= $2
        ), cut AS MATERIALIZED (
            SELECT u.tenant_id, u.user_id, c.seq FROM users u
            CROSS JOIN LATERAL (
                SELECT b.seq FROM ara_mailbox b
                WHERE b.tenant_id = u.tenant_id AND b.user_id = u.user_id
                ORDER BY b.seq DESC OFFSET $3 LIMIT 1
            ) c
        ), beyond AS (
            SELECT m.seq FROM cut JOIN ara_mailbox m
                ON m.tenant_id = cut.tenant_id AND m.user_id = cut.user_id
                AND m.seq <= cut.seq
        ), doomed AS (
            SELECT seq, TRUE AS trimmed FROM beyond
            UNION ALL
            SELECT seq, FALSE FROM ara_mailbox
            WHERE expires_at <= $2 AND seq NOT IN (SELECT seq FROM beyond)
        ), gone AS (
            DELETE FROM ara_mailbox m USING doomed d WHERE m.seq = d.seq
            RETURNING d.trimmed
        )
        SELECT count(*) FILTER (WHERE NOT trimmed) AS expired,
               count(*) FILTER (WHERE trimmed) AS trimmed,
               (SELECT coalesce(max(seq), 0) FROM ara_mailbox) AS high
        FROM gone
    """

    async def depth(self, tenant_id: str | None = None) -> int:
        """Rows a reader can see: each user's count, capped at the bound."""
        row = await self.pg.fetchrow(
            "SELECT coalesce(sum(least(n, $2)), 0) AS n FROM ("
            " SELECT count(*) AS n FROM ara_mailbox"
            " WHERE $1::text IS NULL OR tenant_id = $1 GROUP BY tenant_id, user_id) per_user",
            tenant_id, self.max_per_user,
        )
        return int(row["n"]) if row else 0


FEW = 4  # rows and receipts up to which a write uses scalar parameters


@functools.cache
def few_sql(receipts: int, rows: int) -> str:
    """The statement of ``receipts`` receipts (7 parameters each, first) and ``rows``
    mailbox rows (6 each, in order): one ``INSERT``, the receipts in a ``WITH`` item."""
    def values(count: int, width: int, first: int, casts: dict[int, str]) -> str:
        return ", ".join(
            "(" + ", ".join(f"${first + i * width + k}{casts.get(k, '')}"
                            for k in range(width)) + ")"
            for i in range(count))

    receipt_insert = (
        "INSERT INTO ara_receipts (notification_id, tenant_id, target, event_type,"
        " created_at, expires_at, delivered_to) VALUES "
        + values(receipts, 7, 1, {2: "::jsonb"})
        + " ON CONFLICT (notification_id) DO UPDATE SET delivered_to = EXCLUDED.delivered_to")
    row_insert = (
        "INSERT INTO ara_mailbox (tenant_id, user_id, notification_id, record, expires_at,"
        " delivered) VALUES " + values(rows, 6, 1 + 7 * receipts, {})
        + " ON CONFLICT DO NOTHING")
    if not rows:
        return receipt_insert
    if not receipts:
        return row_insert
    return f"WITH r AS ({receipt_insert}) {row_insert}"


RECEIPT_COLUMNS = ("notification_id", "tenant_id", "target", "event_type", "created_at",
                   "expires_at", "delivered_to")


def receipt_ctes(first: int) -> str:
    """Two data-modifying ``WITH`` items that upsert receipts and their users from the
    nine arrays of ``receipt_arrays``, numbered from ``$first``."""
    a = [f"${first + k}" for k in range(9)]
    return f"""
    r AS (
        INSERT INTO ara_receipts (notification_id, tenant_id, target, event_type,
                                  created_at, expires_at, delivered_to)
        SELECT id, tenant, target::jsonb, event_type, created_at, expires_at, delivered
        FROM unnest({a[0]}::text[], {a[1]}::text[], {a[2]}::text[], {a[3]}::text[],
                    {a[4]}::float8[], {a[5]}::float8[], {a[6]}::int[])
            AS t(id, tenant, target, event_type, created_at, expires_at, delivered)
        ON CONFLICT (notification_id) DO UPDATE SET delivered_to = EXCLUDED.delivered_to
    ),
    ru AS (
        INSERT INTO ara_receipt_users (notification_id, user_id)
        SELECT * FROM unnest({a[7]}::text[], {a[8]}::text[]) ON CONFLICT DO NOTHING
    )"""


def receipt_records(rows: Sequence[ReceiptRow]) -> list[tuple[Any, ...]]:
    """``ara_receipts`` rows (``RECEIPT_COLUMNS``), one per notification: the last of
    each wins, since one statement may not update the same receipt twice."""
    latest = {n.id: (n, t, d) for n, t, d in rows}
    return [(n.id, n.tenant_id, jsoncodec.dumps_str(t.to_dict()), n.event_type,
             n.created_at, n.expires_at, d) for n, t, d in latest.values()]


def receipt_user_pairs(rows: Sequence[ReceiptRow]) -> list[tuple[str, str]]:
    """``ara_receipt_users`` rows: targets of several users only (``RECIPIENTS``)."""
    return list(dict.fromkeys(
        (n.id, u) for n, t, _ in rows if t.kind == "users" for u in t.user_ids))


def receipt_arrays(rows: Sequence[ReceiptRow]) -> list[list[Any]]:
    """The nine parameters of ``receipt_ctes``: the columns of ``receipt_records`` and of
    ``receipt_user_pairs``."""
    records, pairs = receipt_records(rows), receipt_user_pairs(rows)
    return ([list(column) for column in zip(*records, strict=True)] if records
            else [[] for _ in RECEIPT_COLUMNS]) + (
        [list(column) for column in zip(*pairs, strict=True)] if pairs else [[], []])


class PostgresReceipts:
    """``ReceiptStore`` on Postgres.

    Most receipts are written by the router, in the statement that writes its batch's
    mailbox rows (``PostgresMailbox.put``). ``record`` is for those the accepting
    gateway writes itself (a notification split over several partitions, which no
    one router sees whole): concurrent sends share one multi-row statement through
    a ``Coalescer`` (each send still waits for its own).
    """

    MAX_BATCH = 1000
    # Receipts one purge statement deletes at most (see ``purge``).
    PURGE_BATCH = 5000

    def __init__(self, pg: PostgresHandle) -> None:
        self.pg = pg
        self._records: Coalescer[ReceiptRow] = Coalescer(self._record, self.MAX_BATCH)
        # BRIN index upkeep (``_maintain_index``): the ranges the previous purge batch
        # deleted from, those left for later because the table was locked, and whether
        # this role may summarize at all.
        self._recent_ranges: set[int] = set()
        self._unsummarized: set[int] = set()
        self._summarize = True

    async def record(self, notification: Notification, target: Target, delivered_to: int) -> None:
        await self._records.submit([(notification, target, delivered_to)])

    async def _record(self, rows: list[ReceiptRow]) -> None:
        latest: dict[str, ReceiptRow] = {}
        for row in rows:  # one statement may not update the same receipt twice
            latest[row[0].id] = row
        receipts = list(latest.values())
        if len(receipts) == 1:
            # The common case below a few hundred sends a second: scalars instead of
            # nine one-element arrays (asyncpg's array encoding is ~40 isinstance
            # checks per statement; this halves the statement's client CPU).
            n, target, delivered = receipts[0]
            await self.pg.execute(
                """
                WITH r AS (
                    INSERT INTO ara_receipts (notification_id, tenant_id, target, event_type,
                                              created_at, expires_at, delivered_to)
                    VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7)
                    ON CONFLICT (notification_id) DO UPDATE SET delivered_to = EXCLUDED.delivered_to
                )
                INSERT INTO ara_receipt_users (notification_id, user_id)
                SELECT $1, unnest($8::text[]) ON CONFLICT DO NOTHING
                """,
                n.id, n.tenant_id, jsoncodec.dumps_str(target.to_dict()), n.event_type,
                n.created_at, n.expires_at, delivered,
                list(dict.fromkeys(u for _, t, _ in rows if t.kind != "user"
                                   for u in t.user_ids)),
            )
            return
        await self.pg.execute(f"WITH {receipt_ctes(1)} SELECT 1", *receipt_arrays(rows))

    async def set_delivered(self, counts: Sequence[tuple[str, int]]) -> None:
        if not counts:
            return
        await self.pg.execute(
            "UPDATE ara_receipts r SET delivered_to = t.n"
            " FROM unnest($1::text[], $2::int[]) AS t(id, n) WHERE r.notification_id = t.id",
            [c[0] for c in counts], [c[1] for c in counts],
        )

    async def ack(
        self, tenant_id: str, notification_id: str, user_id: str, connection_id: str, now: float
    ) -> AckResult:
        row = await self.pg.fetchrow(
            """
            SELECT r.target->>'type' AS kind,
                   (r.target->>'type' = 'user' AND r.target->>'value' = $3)
                   OR EXISTS (SELECT 1 FROM ara_receipt_users u
                              WHERE u.notification_id = r.notification_id AND u.user_id = $3)
                       AS recipient
            FROM ara_receipts r WHERE r.notification_id = $1 AND r.tenant_id = $2
            """,
            notification_id, tenant_id, user_id,
        )
        if row is None:
            return "unknown"
        if row["kind"] in ("user", "users") and not row["recipient"]:
            return "not_yours"
        status = await self.pg.execute(
            "INSERT INTO ara_acks (notification_id, user_id, connection_id, acked_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            notification_id, user_id, connection_id, now,
        )
        return "acked" if _count(status) > 0 else "duplicate"

    async def get(self, tenant_id: str, notification_id: str) -> Receipt | None:
        row = await self.pg.fetchrow(
            "SELECT target, event_type, created_at, expires_at, delivered_to FROM ara_receipts"
            " WHERE notification_id = $1 AND tenant_id = $2",
            notification_id, tenant_id,
        )
        if row is None:
            return None
        acks = await self.pg.fetch(
            "SELECT user_id, connection_id, acked_at FROM ara_acks WHERE notification_id = $1"
            " ORDER BY acked_at",
            notification_id,
        )
        return Receipt(
            notification_id=notification_id,
            tenant_id=tenant_id,
            target=Target.from_dict(jsoncodec.loads(row["target"])),
            event_type=row["event_type"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            delivered_to=row["delivered_to"],
            acked_by=tuple((a["user_id"], a["connection_id"], a["acked_at"]) for a in acks),
        )

    async def stats(self, tenant_id: str | None, now: float, ack_timeout: float) -> AckStats:
        row = await self.pg.fetchrow(
            """
            SELECT
              count(*) FILTER (WHERE a.acked_at IS NOT NULL) AS acked,
              count(*) FILTER (WHERE a.acked_at IS NULL AND r.created_at + $1 > $2) AS pending,
              count(*) FILTER (WHERE a.acked_at IS NULL AND r.created_at + $1 <= $2) AS expired,
              avg(a.acked_at - r.created_at) FILTER (WHERE a.acked_at IS NOT NULL) AS avg_s
            FROM (""" + RECIPIENTS + """) u
            JOIN ara_receipts r ON r.notification_id = u.notification_id
            LEFT JOIN ara_acks a ON a.notification_id = u.notification_id
                                AND a.user_id = u.user_id
            WHERE r.delivered_to > 0 AND ($3::text IS NULL OR r.tenant_id = $3)
            """,
            ack_timeout, now, tenant_id,
        )
        assert row is not None
        return AckStats(
            pending=int(row["pending"] or 0),
            acknowledged=int(row["acked"] or 0),
            expired=int(row["expired"] or 0),
            average_ack_time_ms=round(float(row["avg_s"] or 0.0) * 1000, 3),
        )

    async def purge(self, before: float) -> int:
        """Delete receipts that expired before ``before`` with their users and ACKs, in
        statements of up to ``PURGE_BATCH`` receipts until one comes back short."""
        await self._maintain_index(set(), summarize_new=True)
        total = 0
        while True:
            deleted, ranges = await self._purge_batch(before)
            total += deleted
            await self._maintain_index(ranges)
            if deleted < self.PURGE_BATCH:
                return total

    # One batch, one statement: the receipts first (found through the BRIN index of schema
    # version 4), then their ``ara_receipt_users`` and ``ara_acks`` rows by id (the first
    # column of both primary keys). Returns the count and the index ranges it deleted from.
    _PURGE_SQL = f"""
        WITH gone AS (
            DELETE FROM ara_receipts WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM ara_receipts WHERE expires_at < $1 LIMIT $2))
            RETURNING notification_id, ctid
        ), users AS (
            DELETE FROM ara_receipt_users
            WHERE notification_id = ANY(ARRAY(SELECT notification_id FROM gone))
        ), acks AS (
            DELETE FROM ara_acks
            WHERE notification_id = ANY(ARRAY(SELECT notification_id FROM gone))
        )
        SELECT count(*) AS deleted, coalesce(array_agg(DISTINCT
                   (ctid::text::point)[0]::bigint / {RECEIPT_BRIN_PAGES} * {RECEIPT_BRIN_PAGES}),
               '{{}}') AS ranges
        FROM gone
    """

    async def _purge_batch(self, before: float) -> tuple[int, set[int]]:
        """One batch in a transaction of its own.

        The planner is kept off a sequential scan: its row estimates still count what
        earlier purges deleted until the next ``ANALYZE``, and the physical order of
        reused space makes it rate the BRIN index low, so it would read the table from the
        start until it found a batch's worth; the index reads only ranges whose summary
        says they hold expired receipts. JIT is off as for the mailbox purge.
        """
        try:
            async with self.pg.pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL enable_seqscan = off; SET LOCAL jit = off")
                row = await conn.fetchrow(self._PURGE_SQL, before, self.PURGE_BATCH)
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc
        assert row is not None
        return int(row["deleted"]), set(row["ranges"])

    async def _maintain_index(self, ranges: set[int], summarize_new: bool = False) -> None:
        """Keep the BRIN index narrow: summarize what it has not summarized yet, and the
        ranges a batch deleted from over again.

        A BRIN range is summarized only once it is full (by ``autosummarize`` or a vacuum,
        whenever they run), and until then matches every search; so each purge first
        summarizes the ranges filled since the last one. A summarized range's min/max only
        ever widens: rows deleted from it stay in it, space they free is reused by new
        receipts, and after one round of that every range would match every purge, which
        would then read the whole table per batch (measured on a steady insert-and-purge
        load). Summarized again after the delete, a range covers only its live rows. Rows
        deleted by a transaction a concurrent one could still see are summarized as if
        live, so each batch also redoes the ranges of the batch before it.

        These functions take the table's SHARE UPDATE EXCLUSIVE lock, which autovacuum and
        ``ANALYZE`` hold while they work; a backend waiting for it has autovacuum cancelled,
        which on a large table could keep ``ara_receipts`` from ever being vacuumed. So the
        lock is taken with ``NOWAIT``, and when it is busy the ranges wait for the next
        batch. Only the owner of the index may do this: a role that is not gets a warning
        once and purges without it, correctly but reading more.
        """
        todo = ranges | self._recent_ranges | self._unsummarized
        self._recent_ranges = ranges
        if not self._summarize or not (todo or summarize_new):
            return
        blocks = sorted(todo)
        try:
            async with self.pg.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "LOCK TABLE ara_receipts IN SHARE UPDATE EXCLUSIVE MODE NOWAIT")
                if summarize_new:
                    await conn.execute(
                        "SELECT brin_summarize_new_values('ara_receipts_expiry_brin')")
                if blocks:
                    await conn.execute(
                        "SELECT count(brin_desummarize_range('ara_receipts_expiry_brin', b))"
                        " FROM unnest($1::bigint[]) AS b", blocks)
                    await conn.execute(
                        "SELECT sum(brin_summarize_range('ara_receipts_expiry_brin', b))"
                        " FROM unnest($1::bigint[]) AS b", blocks)
        except asyncpg.exceptions.LockNotAvailableError:
            self._unsummarized = todo  # a vacuum or ANALYZE is at work: next batch
            return
        except (asyncpg.exceptions.InsufficientPrivilegeError,
                asyncpg.exceptions.UndefinedTableError) as exc:
            self._summarize = False
            log.warning("receipt purge: cannot maintain ara_receipts_expiry_brin (%s);"
                        " purges will read more of ara_receipts than they need", exc)
            return
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc
        self._unsummarized = set()


class PostgresTemplates:
    """``TemplateStore`` on Postgres, so every gateway sees the same templates."""

    def __init__(self, pg: PostgresHandle) -> None:
        self.pg = pg

    _body = staticmethod(encode_template)
    _template = staticmethod(decode_template)

    async def create(self, template: Template) -> bool:
        status = await self.pg.execute(
            "INSERT INTO ara_templates (tenant_id, id, body) VALUES ($1, $2, $3::jsonb)"
            " ON CONFLICT DO NOTHING",
            template.tenant_id, template.id, self._body(template),
        )
        return _count(status) > 0

    async def replace(self, template: Template) -> bool:
        status = await self.pg.execute(
            "UPDATE ara_templates SET body = $3::jsonb WHERE tenant_id = $1 AND id = $2",
            template.tenant_id, template.id, self._body(template),
        )
        return _count(status) > 0

    async def get(self, tenant_id: str, template_id: str) -> Template | None:
        row = await self.pg.fetchrow(
            "SELECT body::text AS body FROM ara_templates WHERE tenant_id = $1 AND id = $2",
            tenant_id, template_id,
        )
        return None if row is None else self._template(tenant_id, template_id, row["body"])

    async def list(self, tenant_id: str) -> list[Template]:
        rows = await self.pg.fetch(
            "SELECT id, body::text AS body FROM ara_templates WHERE tenant_id = $1 ORDER BY id",
            tenant_id,
        )
        return [self._template(tenant_id, r["id"], r["body"]) for r in rows]

    async def delete(self, tenant_id: str, template_id: str) -> bool:
        status = await self.pg.execute(
            "DELETE FROM ara_templates WHERE tenant_id = $1 AND id = $2", tenant_id, template_id
        )
        return _count(status) > 0
