"""Offline queue against Postgres: enqueue and drain rates of ``PostgresMailbox``.

    python bench/offline_queue.py --messages 100000 --users 2000

Enqueue: ``--messages`` notifications for ``--users`` offline users written
with ``PostgresMailbox.put`` in batches of ``--batch`` (the router's batch
size), ``--writers`` batches in flight (one per partition a router works
on). The per-user bound is not paid on the write (reads apply it, and the
periodic purge trims storage), so the purge that follows the enqueue is timed
too: ``purge_expired`` over the users just written, the work the write no
longer does. Drain: every user reconnects once
and replays its queue: ``pending()`` then ``mark_delivered()`` (the
at-least-once replay), ``--writers`` users at a time; then each entry is
ACKed one by one (``ack()``), as clients do.

Baseline, same run and database: the fastest plain batched write asyncpg
offers for the same rows (``copy_records_to_table`` into a table of the
same shape without the per-user bound) and a plain per-user
``SELECT ... ORDER BY seq`` for the drain.

The Python process runs on core 1; Postgres is the machine's server.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import uvloop

from bench._common import (
    commit_latency,
    create_database,
    drop_database,
    pin_self,
    ratio,
    self_cpu,
    write_result,
)
from common import jsoncodec
from common.backends.base import MailboxPut
from common.backends.postgres import PostgresHandle, PostgresMailbox
from common.protocol import Notification

PAYLOAD = {"order_id": "ORD-2026-000123", "status": "shipped", "amount": 99.5}


def make_puts(messages: int, users: int) -> list[MailboxPut]:
    rng = random.Random(11)
    return [
        MailboxPut(f"user-{rng.randrange(users)}",
                   Notification.create("default", "order.shipped", PAYLOAD, default_ttl=3600),
                   delivered=False)
        for _ in range(messages)
    ]


async def in_flight(jobs: list[Any], width: int) -> None:
    sem = asyncio.Semaphore(width)

    async def one(job: Any) -> None:
        async with sem:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


async def bench_mailbox(dsn: str, puts: list[MailboxPut], users: int, batch: int,
                        writers: int, max_per_user: int) -> dict[str, Any]:
    pg = PostgresHandle(dsn, min_size=writers, max_size=writers)
    await pg.open()
    mailbox = PostgresMailbox(pg, max_per_user)
    try:
        batches = [puts[i:i + batch] for i in range(0, len(puts), batch)]
        c0, t0 = self_cpu(), time.perf_counter()
        await in_flight([lambda b=b: mailbox.put(b) for b in batches], writers)
        enqueue_s, enqueue_cpu = time.perf_counter() - t0, self_cpu() - c0
        t0 = time.perf_counter()
        await mailbox.purge_expired(time.time())
        purge_s = time.perf_counter() - t0
        stored = await mailbox.depth()

        names = [f"user-{i}" for i in range(users)]
        replayed = 0
        all_ids: list[tuple[str, str]] = []

        async def drain(user: str) -> None:
            nonlocal replayed
            entries = await mailbox.pending("default", user)
            replayed += len(entries)
            ids = [(user, e.notification.id) for e in entries]
            all_ids.extend(ids)
            await mailbox.mark_delivered("default", ids)

        c0, t0 = self_cpu(), time.perf_counter()
        await in_flight([lambda u=u: drain(u) for u in names], writers)
        drain_s, drain_cpu = time.perf_counter() - t0, self_cpu() - c0

        sample = all_ids[: min(len(all_ids), 20_000)]
        t0 = time.perf_counter()
        await in_flight([lambda p=p: mailbox.ack("default", p[0], p[1]) for p in sample], writers)
        ack_s = time.perf_counter() - t0
    finally:
        await pg.close()
    return {
        "enqueued": len(puts),
        "stored": stored,
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_per_s": round(len(puts) / enqueue_s),
        "enqueue_client_cpu_us_per_entry": round(enqueue_cpu / len(puts) * 1e6, 2),
        "purge_after_enqueue_s": round(purge_s, 3),
        "drained": replayed,
        "drain_s": round(drain_s, 3),
        "drain_per_s": round(replayed / drain_s) if drain_s else None,
        "drain_client_cpu_us_per_entry": round(drain_cpu / max(1, replayed) * 1e6, 2),
        "acks": len(sample),
        "acks_per_s": round(len(sample) / ack_s) if ack_s else None,
    }


async def bench_plain(dsn: str, puts: list[MailboxPut], users: int, batch: int,
                      writers: int) -> dict[str, Any]:
    pool = await asyncpg.create_pool(dsn, min_size=writers, max_size=writers)
    try:
        await pool.execute(
            "CREATE TABLE plain_queue (seq BIGSERIAL PRIMARY KEY, tenant_id TEXT NOT NULL,"
            " user_id TEXT NOT NULL, notification_id TEXT NOT NULL, record BYTEA NOT NULL,"
            " expires_at DOUBLE PRECISION NOT NULL, delivered BOOLEAN NOT NULL DEFAULT FALSE,"
            " UNIQUE (tenant_id, user_id, notification_id));"
            "CREATE INDEX ON plain_queue (tenant_id, user_id, seq)"
        )
        rows = [("default", p.user_id, p.notification.id,
                 jsoncodec.dumps(p.notification.to_record()), p.notification.expires_at, False)
                for p in puts]
        batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
        columns = ["tenant_id", "user_id", "notification_id", "record", "expires_at", "delivered"]

        async def copy(b: list[Any]) -> None:
            async with pool.acquire() as conn:
                await conn.copy_records_to_table("plain_queue", records=b, columns=columns)

        t0 = time.perf_counter()
        await in_flight([lambda b=b: copy(b) for b in batches], writers)
        enqueue_s = time.perf_counter() - t0
        drained = 0

        async def drain(user: str) -> None:
            nonlocal drained
            got = await pool.fetch("SELECT record FROM plain_queue WHERE tenant_id = $1 AND"
                                   " user_id = $2 ORDER BY seq", "default", user)
            drained += len(got)

        t0 = time.perf_counter()
        await in_flight([lambda u=u: drain(f"user-{u}") for u in range(users)], writers)
        drain_s = time.perf_counter() - t0
    finally:
        await pool.close()
    return {
        "enqueue_per_s": round(len(rows) / enqueue_s),
        "drain_per_s": round(drained / drain_s) if drain_s else None,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    puts = make_puts(args.messages, args.users)
    dsn = await create_database(synchronous_commit=args.pg_sync_commit == "on")
    try:
        commit = await commit_latency(dsn, 100)
        plain = await bench_plain(dsn, puts, args.users, args.batch, args.writers)
        print(f"baseline (COPY / plain SELECT): enqueue {plain['enqueue_per_s']}/s, "
              f"drain {plain['drain_per_s']}/s", flush=True)
        mailbox = await bench_mailbox(dsn, puts, args.users, args.batch, args.writers,
                                      args.max_per_user)
        print(f"PostgresMailbox: enqueue {mailbox['enqueue_per_s']}/s, "
              f"drain {mailbox['drain_per_s']}/s, ack {mailbox['acks_per_s']}/s", flush=True)
    finally:
        await drop_database(dsn)
    summary = {
        "enqueue_per_s": mailbox["enqueue_per_s"],
        "drain_per_s": mailbox["drain_per_s"],
        "enqueue_ratio_to_copy": ratio(mailbox["enqueue_per_s"], plain["enqueue_per_s"]),
        "drain_ratio_to_select": ratio(mailbox["drain_per_s"], plain["drain_per_s"]),
        "target_enqueue_per_s_min": 20_000,
        "pg_synchronous_commit": args.pg_sync_commit,
        "pg_commit_p50_ms": commit["p50_ms"],
        "pg_commit_p99_ms": commit["p99_ms"],
    }
    print("summary:", summary)
    return {"messages": args.messages, "users": args.users, "batch": args.batch,
            "writers": args.writers, "mailbox": mailbox, "baseline": plain, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--max-per-user", type=int, default=100)
    parser.add_argument("--pg-sync-commit", choices=("on", "off"), default="on")
    parser.add_argument("--name", default="offline_queue")
    args = parser.parse_args()
    pin_self()
    write_result(args.name, uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
