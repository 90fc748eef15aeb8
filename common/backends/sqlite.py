"""Embedded persistence in one SQLite file: mailbox, receipts and templates.

The embedded node must keep queued notifications across a restart with no
server to run, so everything durable goes into ``SQLITE_PATH`` (WAL mode,
one connection on aiosqlite's worker thread).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import aiosqlite

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
from common.protocol import Notification, Target

SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    notification_id TEXT NOT NULL,
    record BLOB NOT NULL,
    expires_at REAL NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant_id, user_id, notification_id)
);
CREATE INDEX IF NOT EXISTS mailbox_user ON mailbox (tenant_id, user_id, seq);
CREATE INDEX IF NOT EXISTS mailbox_expiry ON mailbox (expires_at);
CREATE TABLE IF NOT EXISTS receipts (
    notification_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    target TEXT NOT NULL,
    event_type TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    delivered_to INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_tenant ON receipts (tenant_id, created_at);
CREATE INDEX IF NOT EXISTS receipts_expiry ON receipts (expires_at);
CREATE TABLE IF NOT EXISTS receipt_users (
    notification_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (notification_id, user_id)
);
CREATE TABLE IF NOT EXISTS acks (
    notification_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    acked_at REAL NOT NULL,
    PRIMARY KEY (notification_id, user_id)
);
CREATE TABLE IF NOT EXISTS templates (
    tenant_id TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
"""


P = ParamSpec("P")
R = TypeVar("R")


class _HasDatabase(Protocol):
    database: SQLiteDatabase


def serialized(
    method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]:
    """Run a store method under the database lock."""

    @functools.wraps(method)
    async def wrapper(self: _HasDatabase, *args: P.args, **kwargs: P.kwargs) -> R:
        async with self.database.lock:
            return await method(self, *args, **kwargs)

    return wrapper


class SQLiteDatabase:
    """The one SQLite connection the embedded stores share."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        # One connection, many tasks: statements and their commit must not interleave.
        self.lock = asyncio.Lock()

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self.path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SQLite database is not open")
        return self._db


class SQLiteMailbox:
    """``Mailbox`` on SQLite: newest ``max_per_user`` kept, oldest replayed first."""

    def __init__(self, database: SQLiteDatabase, max_per_user: int) -> None:
        self.database = database
        self.max_per_user = max_per_user
        self.dropped = 0

    @serialized
    async def put(
        self, items: Sequence[MailboxPut], receipts: Sequence[ReceiptRow] = ()
    ) -> None:
        if not items and not receipts:
            return
        db = self.database.conn
        await write_receipts(db, receipts)
        rows = [
            (
                n.notification.tenant_id,
                n.user_id,
                n.notification.id,
                jsoncodec.dumps(n.notification.to_record()),
                n.notification.expires_at,
                int(n.delivered),
            )
            for n in items
        ]
        await db.executemany(
            "INSERT OR IGNORE INTO mailbox"
            " (tenant_id, user_id, notification_id, record, expires_at, delivered)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        users = {(n.notification.tenant_id, n.user_id) for n in items}
        for tenant, user in users:
            cursor = await db.execute(
                "DELETE FROM mailbox WHERE tenant_id = ? AND user_id = ? AND seq <= ("
                " SELECT seq FROM mailbox WHERE tenant_id = ? AND user_id = ?"
                " ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (tenant, user, tenant, user, self.max_per_user),
            )
            self.dropped += max(cursor.rowcount, 0)
        await db.commit()

    @serialized
    async def pending(self, tenant_id: str, user_id: str) -> list[MailboxEntry]:
        cursor = await self.database.conn.execute(
            "SELECT record, delivered FROM mailbox"
            " WHERE tenant_id = ? AND user_id = ? AND expires_at > ?"
            " ORDER BY seq",
            (tenant_id, user_id, time.time()),
        )
        rows = await cursor.fetchall()
        return [
            MailboxEntry(Notification.from_record(jsoncodec.loads(r[0])), bool(r[1])) for r in rows
        ]

    @serialized
    async def mark_delivered(self, tenant_id: str, pairs: Sequence[tuple[str, str]]) -> None:
        if not pairs:
            return
        db = self.database.conn
        await db.executemany(
            "UPDATE mailbox SET delivered = 1"
            " WHERE tenant_id = ? AND user_id = ? AND notification_id = ?",
            [(tenant_id, u, i) for u, i in pairs],
        )
        await db.commit()

    @serialized
    async def remove(self, tenant_id: str, user_id: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        db = self.database.conn
        await db.executemany(
            "DELETE FROM mailbox WHERE tenant_id = ? AND user_id = ? AND notification_id = ?",
            [(tenant_id, user_id, i) for i in ids],
        )
        await db.commit()

    @serialized
    async def ack(self, tenant_id: str, user_id: str, notification_id: str) -> bool:
        db = self.database.conn
        cursor = await db.execute(
            "DELETE FROM mailbox WHERE tenant_id = ? AND user_id = ? AND notification_id = ?",
            (tenant_id, user_id, notification_id),
        )
        await db.commit()
        return cursor.rowcount > 0

    @serialized
    async def purge_expired(self, now: float) -> int:
        db = self.database.conn
        cursor = await db.execute("DELETE FROM mailbox WHERE expires_at <= ?", (now,))
        await db.commit()
        return max(cursor.rowcount, 0)

    @serialized
    async def depth(self, tenant_id: str | None = None) -> int:
        if tenant_id is None:
            cursor = await self.database.conn.execute("SELECT count(*) FROM mailbox")
        else:
            cursor = await self.database.conn.execute(
                "SELECT count(*) FROM mailbox WHERE tenant_id = ?", (tenant_id,)
            )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def write_receipts(db: aiosqlite.Connection, rows: Sequence[ReceiptRow]) -> None:
    """Upsert receipts and their users (the caller commits)."""
    for notification, target, delivered_to in rows:
        await db.execute(
            "INSERT OR REPLACE INTO receipts"
            " (notification_id, tenant_id, target, event_type, created_at, expires_at,"
            "  delivered_to) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                notification.id,
                notification.tenant_id,
                jsoncodec.dumps_str(target.to_dict()),
                notification.event_type,
                notification.created_at,
                notification.expires_at,
                delivered_to,
            ),
        )
        if target.user_ids:
            await db.executemany(
                "INSERT OR IGNORE INTO receipt_users (notification_id, user_id) VALUES (?, ?)",
                [(notification.id, u) for u in target.user_ids],
            )


class SQLiteReceipts:
    """``ReceiptStore`` on SQLite."""

    # Receipts one purge transaction deletes at most (see ``purge``).
    PURGE_BATCH = 5000

    def __init__(self, database: SQLiteDatabase) -> None:
        self.database = database

    async def purge(self, before: float) -> int:
        """Delete receipts that expired before ``before`` with their users and ACKs, in
        transactions of up to ``PURGE_BATCH`` receipts until one comes back short.

        The lock is let go between batches: the node's one connection also serves its
        sends and ACKs, which would otherwise wait for the whole purge.
        """
        total = 0
        while True:
            deleted = await self._purge_batch(before)
            total += deleted
            if deleted < self.PURGE_BATCH:
                return total

    @serialized
    async def _purge_batch(self, before: float) -> int:
        db = self.database.conn
        cursor = await db.execute(
            "SELECT notification_id FROM receipts WHERE expires_at < ? LIMIT ?",
            (before, self.PURGE_BATCH),
        )
        ids = [(str(r[0]),) for r in await cursor.fetchall()]
        for table in ("receipt_users", "acks", "receipts"):
            await db.executemany(f"DELETE FROM {table} WHERE notification_id = ?", ids)
        await db.commit()
        return len(ids)

    @serialized
    async def record(self, notification: Notification, target: Target, delivered_to: int) -> None:
        db = self.database.conn
        await write_receipts(db, [(notification, target, delivered_to)])
        await db.commit()

    @serialized
    async def set_delivered(self, counts: Sequence[tuple[str, int]]) -> None:
        if not counts:
            return
        db = self.database.conn
        await db.executemany(
            "UPDATE receipts SET delivered_to = ? WHERE notification_id = ?",
            [(n, nid) for nid, n in counts],
        )
        await db.commit()

    @serialized
    async def ack(
        self, tenant_id: str, notification_id: str, user_id: str, connection_id: str, now: float
    ) -> AckResult:
        db = self.database.conn
        cursor = await db.execute(
            "SELECT target FROM receipts WHERE notification_id = ? AND tenant_id = ?",
            (notification_id, tenant_id),
        )
        row = await cursor.fetchone()
        if row is None:
            return "unknown"
        target = Target.from_dict(jsoncodec.loads(row[0]))
        if target.user_ids:
            cursor = await db.execute(
                "SELECT 1 FROM receipt_users WHERE notification_id = ? AND user_id = ?",
                (notification_id, user_id),
            )
            if await cursor.fetchone() is None:
                return "not_yours"
        cursor = await db.execute(
            "INSERT OR IGNORE INTO acks (notification_id, user_id, connection_id, acked_at)"
            " VALUES (?, ?, ?, ?)",
            (notification_id, user_id, connection_id, now),
        )
        await db.commit()
        return "acked" if cursor.rowcount > 0 else "duplicate"

    @serialized
    async def get(self, tenant_id: str, notification_id: str) -> Receipt | None:
        db = self.database.conn
        cursor = await db.execute(
            "SELECT target, event_type, created_at, expires_at, delivered_to FROM receipts"
            " WHERE notification_id = ? AND tenant_id = ?",
            (notification_id, tenant_id),
        )
        row = await cursor.fetchone()
        if row is None:
            return None
        cursor = await db.execute(
            "SELECT user_id, connection_id, acked_at FROM acks WHERE notification_id = ?"
            " ORDER BY acked_at",
            (notification_id,),
        )
        acks = tuple((str(r[0]), str(r[1]), float(r[2])) for r in await cursor.fetchall())
        return Receipt(
            notification_id=notification_id,
            tenant_id=tenant_id,
            target=Target.from_dict(jsoncodec.loads(row[0])),
            event_type=row[1],
            created_at=row[2],
            expires_at=row[3],
            delivered_to=row[4],
            acked_by=acks,
        )

    @serialized
    async def stats(self, tenant_id: str | None, now: float, ack_timeout: float) -> AckStats:
        tenant_clause = "" if tenant_id is None else " AND r.tenant_id = ?"
        params: tuple[Any, ...] = () if tenant_id is None else (tenant_id,)
        cursor = await self.database.conn.execute(
            "SELECT"
            " sum(CASE WHEN a.acked_at IS NOT NULL THEN 1 ELSE 0 END),"
            " sum(CASE WHEN a.acked_at IS NULL AND r.created_at + ? > ? THEN 1 ELSE 0 END),"
            " sum(CASE WHEN a.acked_at IS NULL AND r.created_at + ? <= ? THEN 1 ELSE 0 END),"
            " avg(CASE WHEN a.acked_at IS NOT NULL THEN (a.acked_at - r.created_at) END)"
            " FROM receipt_users u JOIN receipts r ON r.notification_id = u.notification_id"
            " LEFT JOIN acks a ON a.notification_id = u.notification_id AND a.user_id = u.user_id"
            " WHERE r.delivered_to > 0" + tenant_clause,
            (ack_timeout, now, ack_timeout, now, *params),
        )
        row = await cursor.fetchone()
        acked, pending, expired, avg = row if row else (0, 0, 0, None)
        return AckStats(
            pending=int(pending or 0),
            acknowledged=int(acked or 0),
            expired=int(expired or 0),
            average_ack_time_ms=round(float(avg or 0.0) * 1000, 3),
        )


class SQLiteTemplates:
    """``TemplateStore`` on SQLite."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self.database = database

    _encode = staticmethod(encode_template)
    _decode = staticmethod(decode_template)

    @serialized
    async def create(self, template: Template) -> bool:
        db = self.database.conn
        cursor = await db.execute(
            "INSERT OR IGNORE INTO templates (tenant_id, id, body) VALUES (?, ?, ?)",
            (template.tenant_id, template.id, self._encode(template)),
        )
        await db.commit()
        return cursor.rowcount > 0

    @serialized
    async def replace(self, template: Template) -> bool:
        db = self.database.conn
        cursor = await db.execute(
            "UPDATE templates SET body = ? WHERE tenant_id = ? AND id = ?",
            (self._encode(template), template.tenant_id, template.id),
        )
        await db.commit()
        return cursor.rowcount > 0

    @serialized
    async def get(self, tenant_id: str, template_id: str) -> Template | None:
        cursor = await self.database.conn.execute(
            "SELECT body FROM templates WHERE tenant_id = ? AND id = ?", (tenant_id, template_id)
        )
        row = await cursor.fetchone()
        return None if row is None else self._decode(tenant_id, template_id, row[0])

    @serialized
    async def list(self, tenant_id: str) -> list[Template]:
        cursor = await self.database.conn.execute(
            "SELECT id, body FROM templates WHERE tenant_id = ? ORDER BY id", (tenant_id,)
        )
        return [self._decode(tenant_id, r[0], r[1]) for r in await cursor.fetchall()]

    @serialized
    async def delete(self, tenant_id: str, template_id: str) -> bool:
        db = self.database.conn
        cursor = await db.execute(
            "DELETE FROM templates WHERE tenant_id = ? AND id = ?", (tenant_id, template_id)
        )
        await db.commit()
        return cursor.rowcount > 0
