"""A pipelined Redis connection for the per-notification hot paths.

Every notification costs a gateway one Redis round trip to accept it and a
router several to route it. Through redis-py 8's client each costs 80-100 µs
of CPU on top of the socket work, most of it the pool checkout (a lock, four
observability counters and a readiness probe per call) and, with a socket
timeout set, a task per write. A ``RedisLane`` keeps one redis-py
``Connection`` of its own: callers write their commands at once (packed by
hiredis) and a reader task hands replies back in order, as RESP guarantees,
so concurrent callers share the connection without waiting for each other's
round trips. The same pipeline measured 69 µs through the pool and 21 µs on a
connection of its own.

What it gives up: redis-py's reply callbacks (callers get hiredis' raw
replies: lists, bytes, ints) and its retry. A lane never retries: on a
connection error or a deadline every command in flight fails with a
``redis.exceptions`` error, the connection is dropped, and the next call
connects again, so the caller's circuit breaker sees the same errors as with
the client. Blocking commands get a lane of their own (``blocking=True``),
which serves one caller at a time so a blocking read cannot hold up others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = Sequence[bytes | str | int | float]


@functools.cache
def connection_options() -> dict[str, Any]:
    """Options for every redis-py connection this service opens.

    redis-py 8 builds a ``DriverInfo`` for each new connection, and that looks its
    own version up with ``importlib.metadata`` every time: ~0.6 ms of CPU per
    connection here (6 ms under a profiler), paid again for each connection a pool
    opens, i.e. during a burst of client (re)connects, when a gateway is busiest.
    One ``DriverInfo`` made once keeps what ``CLIENT SETINFO`` reports and costs
    ~10 µs. Versions before ``driver_info`` existed looked the version up once, at
    import, and get no option.
    """
    try:
        from redis.driver_info import DriverInfo
        from redis.utils import get_lib_version
    except ImportError:
        return {}
    return {"driver_info": DriverInfo(lib_version=get_lib_version())}

READ_SIZE = 65536
_MORE: Any = object()  # hiredis' "not enough data yet"
_PUSH: Any = getattr(hiredis, "PushNotification", ())  # hiredis >= 3.2


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[list[Any]]
    expected: int
    deadline: float
    replies: list[Any] = field(default_factory=list)


class RedisLane:
    """One connection; commands written as called, replies matched in order."""

    def __init__(self, url: str, timeout: float = 1.0, blocking: bool = False) -> None:
        # The pool is only a factory for a connection of the right kind (TCP, TLS or
        # unix socket) with the URL's credentials and database; it never lends one.
        self._factory = ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout, decode_responses=False,
            **connection_options(),
        )
        self.timeout = timeout
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._connecting = asyncio.Lock()
        self._exclusive = asyncio.Lock() if blocking else None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Run commands in one round trip; replies in order, error replies as exceptions.

        The lane's ``timeout`` bounds the whole round trip (for a blocking lane it
        must include the command's own ``BLOCK``).
        """
        if self._exclusive is None:
            return await self._execute(commands)
        async with self._exclusive:
            return await self._execute(commands)

    async def _execute(self, commands: Sequence[Command]) -> list[Any]:
        conn = self._conn if self._conn is not None else await self._connect()
        if not conn.is_connected:
            # Dropped under the reader (which resets the lane in a moment); redis-py would
            # quietly reconnect it on write, out of step with the lane's reader.
            error = RedisConnectionError("Redis connection lost")
            self._reset(error)
            raise error
        payload = b"".join([hiredis.pack_command(tuple(c)) for c in commands])  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        waiter = _Waiter(loop.create_future(), len(commands), deadline)
        self._waiters.append(waiter)
        if self._watchdog is None or deadline < self._watchdog.when():
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = loop.call_at(deadline, self._check_deadlines)
        try:
            # Written synchronously (no await before it since the append), so the
            # order of the writes is the order of the waiters.
            await conn.send_packed_command(payload, check_health=False)
        except Exception as exc:
            self._reset(exc)
            raise
        return await waiter.future

    def _check_deadlines(self) -> None:
        """One timer per lane, not one per call (a timer per call cost ~15 µs of CPU).

        Replies come in order, so only the oldest waiter's deadline matters; if it has
        passed, the replies owed to it (and to everyone behind it) may never come, and
        the connection cannot be trusted to be in step any more.
        """
        self._watchdog = None
        if not self._waiters:
            return
        loop = asyncio.get_running_loop()
        oldest = min(w.deadline for w in self._waiters)
        if oldest <= loop.time():
            self._reset(RedisTimeoutError("Timeout reading from Redis"))
        else:
            self._watchdog = loop.call_at(oldest, self._check_deadlines)

    async def _connect(self) -> AbstractConnection:
        async with self._connecting:
            if self._conn is not None:
                return self._conn
            if self._closed:
                raise RedisConnectionError("lane is closed")
            conn = self._factory.make_connection()
            try:
                # The handshake (HELLO...) reads without a socket timeout: a server that
                # accepts but never answers (SIGSTOPped) must not hold every caller.
                async with asyncio.timeout(self.timeout):
                    await conn.connect()
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                raise RedisTimeoutError("Timeout connecting to Redis") from None
            except Exception:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                raise
            self._conn = conn
            self._reader = asyncio.get_running_loop().create_task(self._read(conn))
            return conn

    async def _read(self, conn: AbstractConnection) -> None:
        stream = getattr(conn, "_reader", None)
        try:
            if isinstance(stream, asyncio.StreamReader):
                await self._read_stream(stream)
            else:  # not the redis-py connection this was written against
                while True:
                    try:
                        reply: Any = await conn.read_response(timeout=math.inf)
                    except ResponseError as exc:
                        reply = exc
                    self._hand_over(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._conn is conn:
                self._reset(exc)

    async def _read_stream(self, stream: asyncio.StreamReader) -> None:
        """Parse replies straight off the connection's stream, as many as each read holds.

        redis-py's ``read_response`` costs four Python calls, a timeout context and
        a few type checks per reply; a pipeline's replies mostly arrive in one read.
        Error replies become the exceptions redis-py would raise (its own table);
        those that mean the connection is unusable (``LOADING``...) end it, as they
        do in redis-py.
        """
        reader = hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=_MORE)
        hand_over = self._hand_over
        while True:
            data = await stream.read(READ_SIZE)
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            reader.feed(data)
            reply = reader.gets()
            while reply is not _MORE:
                if isinstance(reply, RedisConnectionError):
                    raise reply
                if not isinstance(reply, _PUSH):  # RESP3 pushes answer no command
                    hand_over(reply)
                reply = reader.gets()

    def _hand_over(self, reply: Any) -> None:
        waiters = self._waiters
        if not waiters:
            raise RedisConnectionError("unexpected reply from Redis")
        waiter = waiters[0]
        waiter.replies.append(reply)
        if len(waiter.replies) == waiter.expected:
            waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(waiter.replies)

    def _reset(self, exc: BaseException) -> None:
        """Fail everything in flight and drop the connection; the next call reconnects."""
        conn, self._conn = self._conn, None
        reader, self._reader = self._reader, None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        error = exc if isinstance(exc, (RedisConnectionError, RedisTimeoutError)) else (
            RedisConnectionError(f"Redis connection lost: {exc}"))
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if conn is not None:
            # nowait: no goodbye to a server that may not answer; the socket just closes.
            asyncio.get_running_loop().create_task(_close_quietly(conn))

    def reset(self) -> None:
        """Drop the connection (Redis went away); calls in flight fail."""
        self._reset(RedisConnectionError("Redis connection reset"))

    async def close(self) -> None:
        self._closed = True
        reader = self._reader
        self.reset()
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


async def _close_quietly(conn: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)


def pairs_to_dict(reply: Any) -> dict[bytes, bytes]:
    """A raw ``HGETALL`` reply as the dict redis-py would give.

    RESP3 (redis-py 8's default where the server has it) already sends a map;
    RESP2 sends ``[field, value, ...]``.
    """
    if not reply:
        return {}
    if isinstance(reply, dict):
        return reply
    it = iter(reply)
    return dict(zip(it, it, strict=True))


def stream_entries(reply: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes] | None]]]]:
    """A raw ``XREAD``/``XREADGROUP`` reply in redis-py's shape: ``[(stream, [(id, fields)])]``.

    RESP3 sends the streams as a map, RESP2 as pairs. Entries deleted while pending
    come back with nil fields; they stay ``None``.
    """
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply
    return [
        (stream, [(entry_id, None if fields is None else pairs_to_dict(fields))
                  for entry_id, fields in entries])
        for stream, entries in streams
    ]
