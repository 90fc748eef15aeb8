"""The fan-out and mailbox hot paths keep the protocol's rules (functional, not timed).

- pre-encoded WebSocket frames are byte-identical to what ``websockets`` builds;
- a connection writes at once while its socket keeps up, queues in order behind a
  slow one, and still closes a consumer that overflows its outbox with 4008;
- the uvicorn protocol stand-ins behave like the asyncio objects they replace;
- the mailbox coalescer merges concurrent writes, keeps order, hands errors back and
  writes in its caller's task when idle;
- the one-statement mailbox write keeps each user's newest ``QUEUE_MAX_SIZE_PER_USER``;
- the send path's shortcuts (ids, header lookups) give what the slower calls gave.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from common.auth import Identity
from gateway.connection import CLOSE_SLOW_CONSUMER, Connection, OutItem
from gateway.fastws import FrameCache, Inbox, Writable, compatible


@pytest.mark.parametrize("size", [0, 1, 125, 126, 1000, 65535, 65536, 200_000])
def test_cached_frame_matches_websockets(size: int) -> None:
    text = "x" * size
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    cache = FrameCache()
    assert cache.encode(text) == expected
    assert cache.encode(text) is cache.encode(text)  # same object: encoded once


def test_uvicorn_protocol_still_has_what_the_fast_path_needs() -> None:
    assert compatible()


class FakeSink:
    """Accepts ``room`` frames at once, then reports the socket as full."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.direct: list[str] = []
        self.queued: list[str] = []
        self.closed: tuple[int, str] | None = None
        self.writable = asyncio.Event()

    def try_send(self, item: OutItem) -> bool:
        if self.room <= 0:
            return False
        self.room -= 1
        self.direct.append(item[2])
        return True

    async def send(self, item: OutItem) -> None:
        await self.writable.wait()
        self.queued.append(item[2])

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def _conn(sink: Any, max_outbox: int = 4) -> Connection:
    conn = Connection("c1", Identity("u1"), "websocket", sink, max_outbox)
    conn.finish_replay([])
    return conn


async def test_direct_writes_then_ordered_queue_then_slow_consumer_close() -> None:
    sink = FakeSink(room=2)
    conn = _conn(sink, max_outbox=4)
    for i in range(5):
        assert conn.push(("notification", f"n{i}", f"f{i}"))
    assert sink.direct == ["f0", "f1"]
    assert [item[2] for item in conn.outbox] == ["f2", "f3", "f4"]
    sink.room = 100  # the socket has room again, but order must hold: queue first
    assert conn.push(("notification", "n5", "f5"))
    assert sink.direct == ["f0", "f1"]
    sink.writable.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert sink.queued == ["f2", "f3", "f4", "f5"]
    assert not conn.outbox
    assert conn.push(("notification", "n6", "f6"))  # caught up: direct again
    assert sink.direct[-1] == "f6"

    slow = FakeSink(room=0)
    conn2 = _conn(slow, max_outbox=2)
    assert conn2.push(("notification", "a", "fa"))
    assert conn2.push(("notification", "b", "fb"))
    assert not conn2.push(("notification", "c", "fc"))
    assert conn2.closed and conn2.close_code == CLOSE_SLOW_CONSUMER
    await asyncio.sleep(0)
    assert slow.closed is not None and slow.closed[0] == CLOSE_SLOW_CONSUMER


async def test_a_failing_direct_write_closes_the_connection() -> None:
    class Gone(FakeSink):
        def try_send(self, item: OutItem) -> bool:
            raise ConnectionError("peer gone")

    conn = _conn(Gone(room=1))
    assert not conn.push(("pong", None, "{}"))
    assert conn.closed
    await asyncio.wait_for(conn.wait_closed(), 1)


async def test_live_traffic_waits_for_replay_and_skips_replayed_ids() -> None:
    sink = FakeSink(room=100)
    conn = Connection("c1", Identity("u1"), "websocket", sink, 10)
    assert conn.push(("connected", None, "hello"))
    assert conn.push_live(("notification", "n1", "live1"), True)
    assert conn.push_live(("notification", "n2", "live2"), True)
    assert conn.push(("notification", "n1", "replay1"))
    conn.finish_replay(["n1"])
    assert sink.direct == ["hello", "replay1", "live2"]


async def test_inbox_and_writable_stand_ins() -> None:
    inbox = Inbox()
    assert inbox.empty()
    getter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait({"type": "a"})
    inbox.put_nowait({"type": "b"})
    assert await asyncio.wait_for(getter, 1) == {"type": "a"}
    assert not inbox.empty()
    assert await inbox.get() == {"type": "b"}
    assert inbox.empty()

    flag = Writable()
    assert flag.is_set()
    assert await flag.wait()
    flag.clear()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    waiters[0].cancel()
    flag.set()
    await asyncio.sleep(0)
    assert all(w.done() for w in waiters)


async def test_coalescer_merges_orders_and_reports_errors() -> None:
    from common.backends.postgres import Coalescer

    writes: list[list[int]] = []
    gate = asyncio.Event()

    async def write(items: list[int]) -> None:
        writes.append(items)
        await gate.wait()
        if -1 in items:
            raise RuntimeError("boom")

    merged: Coalescer[int] = Coalescer(write, max_items=100, parallel=1)
    first = asyncio.ensure_future(merged.submit([1, 2]))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(merged.submit([i])) for i in (3, 4, 5)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 1)
    assert writes == [[1, 2], [3, 4, 5]]

    gate.clear()
    in_flight = asyncio.ensure_future(merged.submit([0]))
    await asyncio.sleep(0)
    bad = asyncio.ensure_future(merged.submit([-1]))
    good_in_same_write = asyncio.ensure_future(merged.submit([6]))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(in_flight, 1)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(bad, 1)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(good_in_same_write, 1)
    assert writes[-2:] == [[0], [-1, 6]]


async def test_coalescer_writes_in_the_callers_task_when_idle_and_hands_on_when_cancelled(
) -> None:
    from common.backends.postgres import Coalescer

    writers: list[asyncio.Task[Any] | None] = []
    gate = asyncio.Event()
    written: list[list[int]] = []

    async def write(items: list[int]) -> None:
        writers.append(asyncio.current_task())
        await gate.wait()
        written.append(items)

    merged: Coalescer[int] = Coalescer(write, max_items=100, parallel=1)
    gate.set()
    caller = asyncio.ensure_future(merged.submit([1]))
    await asyncio.wait_for(caller, 1)
    assert writers == [caller] and written == [[1]]  # no task of its own

    gate.clear()
    first = asyncio.ensure_future(merged.submit([2]))  # idle: written in ``first``
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(merged.submit([i])) for i in (3, 4)]
    await asyncio.sleep(0)
    first.cancel()  # abandons its own write only
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    await asyncio.wait_for(asyncio.gather(*waiting), 1)
    assert written[1:] == [[3, 4]]
    assert writers[-1] not in (first, *waiting)  # a writer task took them over


@pytest.mark.cluster
async def test_postgres_mailbox_keeps_the_newest_per_user() -> None:
    from common.backends.base import MailboxPut
    from common.backends.postgres import PostgresHandle, PostgresMailbox
    from common.protocol import Notification
    from tests.cluster_harness import create_database, drop_database, migrate, pg_admin_dsn

    admin = pg_admin_dsn()
    dsn = await create_database(admin)
    try:
        await migrate(dsn)
        pg = PostgresHandle(dsn)
        await pg.open()
        try:
            box = PostgresMailbox(pg, max_per_user=5)

            def puts(user: str, n: int) -> list[MailboxPut]:
                return [MailboxPut(user, Notification.create("t", "e", {"i": i}, default_ttl=60),
                                   False) for i in range(n)]

            first = puts("a", 4) + puts("b", 2)
            await box.put(first)
            second = puts("a", 3)
            third = puts("b", 8)  # more than the bound in one write: only the newest 5
            await asyncio.gather(box.put(second), box.put(third))
            a = [e.notification.id for e in await box.pending("t", "a")]
            b = [e.notification.id for e in await box.pending("t", "b")]
            assert a == [p.notification.id for p in first[2:4] + second]
            assert b == [p.notification.id for p in third[3:]]
            await box.mark_delivered("t", [("a", a[0])])
            entries = await box.pending("t", "a")
            assert [e.delivered for e in entries] == [True, False, False, False, False]
        finally:
            with contextlib.suppress(Exception):
                await pg.close()
    finally:
        await drop_database(admin, dsn)


def test_new_ids_are_version_4_uuids_in_canonical_text() -> None:
    import uuid

    from common.protocol import new_id

    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_header_lookup_takes_the_first_of_repeated_headers_like_starlette() -> None:
    from starlette.requests import Request

    from gateway.http import header

    scope = {"type": "http", "headers": [(b"x-api-key", b"first"), (b"x-api-key", b"second"),
                                         (b"content-type", b"application/json")]}
    request = Request(scope)
    assert header(request, b"x-api-key") == request.headers.get("x-api-key") == "first"
    assert header(request, b"content-type") == "application/json"
    assert header(request, b"x-tenant-id") is None
    assert header(Request(scope), b"x-api-key") == "first"  # the table lives in the scope
