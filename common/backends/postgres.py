"""Postgres backends of the cluster: mailbox, receipts, templates, and the schema.

Writes are batched: one ``INSERT ... SELECT FROM unnest(...)`` per call,
however many users a notification or a router batch touches. The per-user
bound (keep the newest ``QUEUE_MAX_SIZE_PER_USER``) is enforced in the same
round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import asyncpg

from common import jsoncodec
from common.backends.base import (
    AckResult,
    AckStats,
    MailboxEntry,
    MailboxPut,
    Receipt,
    Template,
    decode_template,
    encode_template,
)
from common.errors import BackendUnavailable
from common.protocol import Notification, Target

log = logging.getLogger("ara.postgres")

SCHEMA_VERSION = 1
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
]


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

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=self.min_size, max_size=self.max_size, timeout=5,
            command_timeout=10, reset=_no_session_reset,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

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
            return list(await self.pool.fetch(sql, *args))
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc

    async def execute(self, sql: str, *args: Any) -> str:
        try:
            return str(await self.pool.execute(sql, *args))
        except PG_DOWN as exc:
            raise BackendUnavailable("postgres", f"postgres unavailable: {exc}") from exc

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await self.pool.fetchrow(sql, *args)
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
    Writes run in their own tasks, so a cancelled caller does not strand others.
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
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((items, done))
        if self._running < self._parallel:
            self._running += 1
            task = loop.create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await done

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
    """

    MAX_BATCH = 5000

    def __init__(self, pg: PostgresHandle, max_per_user: int) -> None:
        self.pg = pg
        self.max_per_user = max_per_user
        self.dropped = 0
        self._puts: Coalescer[MailboxPut] = Coalescer(self._put, self.MAX_BATCH)
        self._marks: Coalescer[tuple[str, str, str]] = Coalescer(
            self._mark_delivered, self.MAX_BATCH
        )

    async def put(self, items: Sequence[MailboxPut]) -> None:
        if items:
            await self._puts.submit(items)

    async def _put(self, items: list[MailboxPut]) -> None:
        """Insert in order and keep each user's newest ``max_per_user``, in one statement.

        The statement's snapshot does not see its own inserts, so the trim keeps the
        user's newest ``max_per_user`` minus the number just added of the existing
        rows: it finds the first row to drop through the ``(tenant_id, user_id, seq)``
        index and deletes it and everything older. A user with more than
        ``max_per_user`` items in the batch only gets the newest ones inserted.
        """
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
        status = await self.pg.execute(
            """
            WITH incoming AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[],
                                     $5::float8[], $6::bool[])
                    WITH ORDINALITY AS t(tenant_id, user_id, notification_id, record,
                                         expires_at, delivered, ord)
            ), inserted AS (
                INSERT INTO ara_mailbox
                    (tenant_id, user_id, notification_id, record, expires_at, delivered)
                SELECT tenant_id, user_id, notification_id, record, expires_at, delivered
                FROM incoming ORDER BY ord
                ON CONFLICT DO NOTHING
                RETURNING tenant_id, user_id
            ), added AS (
                SELECT tenant_id, user_id, count(*) AS n FROM inserted GROUP BY 1, 2
            ), cut AS MATERIALIZED (
                SELECT a.tenant_id, a.user_id, c.seq FROM added a
                CROSS JOIN LATERAL (
                    SELECT b.seq FROM ara_mailbox b
                    WHERE b.tenant_id = a.tenant_id AND b.user_id = a.user_id
                    ORDER BY b.seq DESC OFFSET GREATEST($7 - a.n, 0) LIMIT 1
                ) c
            )
            DELETE FROM ara_mailbox m USING cut
            WHERE m.tenant_id = cut.tenant_id AND m.user_id = cut.user_id AND m.seq <= cut.seq
            """,
            [i.notification.tenant_id for i in items],
            [i.user_id for i in items],
            [i.notification.id for i in items],
            [i.notification.record_json() for i in items],
            [i.notification.expires_at for i in items],
            [i.delivered for i in items],
            self.max_per_user,
        )
        self.dropped += _count(status)

    async def pending(self, tenant_id: str, user_id: str) -> list[MailboxEntry]:
        rows = await self.pg.fetch(
            "SELECT record, delivered FROM ara_mailbox"
            " WHERE tenant_id = $1 AND user_id = $2 AND expires_at > $3 ORDER BY seq",
            tenant_id, user_id, time.time(),
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

    async def remove(self, tenant_id: str, user_id: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        await self.pg.execute(
            "DELETE FROM ara_mailbox WHERE tenant_id = $1 AND user_id = $2"
            " AND notification_id = ANY($3::text[])",
            tenant_id, user_id, list(ids),
        )

    async def ack(self, tenant_id: str, user_id: str, notification_id: str) -> bool:
        status = await self.pg.execute(
            "DELETE FROM ara_mailbox WHERE tenant_id = $1 AND user_id = $2"
            " AND notification_id = $3",
            tenant_id, user_id, notification_id,
        )
        return _count(status) > 0

    async def purge_expired(self, now: float) -> int:
        return _count(await self.pg.execute("DELETE FROM ara_mailbox WHERE expires_at <= $1", now))

    async def depth(self, tenant_id: str | None = None) -> int:
        if tenant_id is None:
            row = await self.pg.fetchrow("SELECT count(*) AS n FROM ara_mailbox")
        else:
            row = await self.pg.fetchrow(
                "SELECT count(*) AS n FROM ara_mailbox WHERE tenant_id = $1", tenant_id
            )
        return int(row["n"]) if row else 0


ReceiptRow = tuple[Notification, Target, int]


class PostgresReceipts:
    """``ReceiptStore`` on Postgres.

    Receipts are written on every send's request path; concurrent sends share one
    multi-row statement through a ``Coalescer`` (each send still waits for its own).
    """

    MAX_BATCH = 1000

    def __init__(self, pg: PostgresHandle) -> None:
        self.pg = pg
        self._records: Coalescer[ReceiptRow] = Coalescer(self._record, self.MAX_BATCH)

    async def record(self, notification: Notification, target: Target, delivered_to: int) -> None:
        await self._records.submit([(notification, target, delivered_to)])

    async def _record(self, rows: list[ReceiptRow]) -> None:
        latest: dict[str, ReceiptRow] = {}
        for row in rows:  # one statement may not update the same receipt twice
            latest[row[0].id] = row
        receipts = list(latest.values())
        pairs = list(dict.fromkeys(
            (n.id, user) for n, target, _ in rows for user in target.user_ids
        ))
        await self.pg.execute(
            """
            WITH r AS (
                INSERT INTO ara_receipts (notification_id, tenant_id, target, event_type,
                                          created_at, expires_at, delivered_to)
                SELECT id, tenant, target::jsonb, event_type, created_at, expires_at, delivered
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[],
                            $6::float8[], $7::int[])
                    AS t(id, tenant, target, event_type, created_at, expires_at, delivered)
                ON CONFLICT (notification_id) DO UPDATE SET delivered_to = EXCLUDED.delivered_to
            )
            INSERT INTO ara_receipt_users (notification_id, user_id)
            SELECT * FROM unnest($8::text[], $9::text[]) ON CONFLICT DO NOTHING
            """,
            [n.id for n, _, _ in receipts],
            [n.tenant_id for n, _, _ in receipts],
            [jsoncodec.dumps_str(t.to_dict()) for _, t, _ in receipts],
            [n.event_type for n, _, _ in receipts],
            [n.created_at for n, _, _ in receipts],
            [n.expires_at for n, _, _ in receipts],
            [d for _, _, d in receipts],
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )

    async def ack(
        self, tenant_id: str, notification_id: str, user_id: str, connection_id: str, now: float
    ) -> AckResult:
        row = await self.pg.fetchrow(
            """
            SELECT r.target->>'type' AS kind,
                   EXISTS (SELECT 1 FROM ara_receipt_users u
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
            FROM ara_receipt_users u
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
