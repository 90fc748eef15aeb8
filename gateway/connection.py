"""One client connection, transport-independent, with a bounded outbox.

Routing never awaits a socket. When the transport can take a frame at once
(``Sink.try_send``: the socket is below its write high-water mark and
nothing is queued before it) the frame is written synchronously, with no
task; otherwise it goes to the connection's outbox and a writer task (alive
only while there is something to write) pushes it out in order. A client
that lets its outbox overflow is closed with 4008 instead of growing the
process's memory.

Per-connection state is kept small because a gateway holds thousands of
idle sockets: the outbox deque, the held-back list, the replayed-id set and
the closed event are only allocated when first needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Set
from typing import Literal, Protocol

from common.auth import Identity

log = logging.getLogger("ara.gateway.connection")

# (sse event name, sse id, json frame)
OutItem = tuple[str, str | None, str]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_SLOW_CONSUMER = 4008
CLOSE_LIMIT = 4029
CLOSE_IDLE = 1000

Transport = Literal["websocket", "sse"]


class Sink(Protocol):
    """What a transport must offer the connection: write one item, close.

    A sink may also offer ``try_send(item) -> bool``: write at once if the socket can
    take it without waiting, False otherwise (raising if the peer is gone).
    """

    async def send(self, item: OutItem) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


_NO_IDS: frozenset[str] = frozenset()
_EMPTY: tuple[()] = ()


class Connection:
    """State of one socket: identity, channels, outbox and replay gate."""

    __slots__ = (
        "_closed_event",
        "_outbox",
        "_try_send",
        "_writer",
        "channels",
        "close_code",
        "closed",
        "connected_at",
        "expiry_timer",
        "held",
        "id",
        "identity",
        "last_seen",
        "max_outbox",
        "replayed_ids",
        "replaying",
        "sink",
        "transport",
    )

    def __init__(
        self,
        connection_id: str,
        identity: Identity,
        transport: Transport,
        sink: Sink,
        max_outbox: int,
    ) -> None:
        self.id = connection_id
        self.identity = identity
        self.transport: Transport = transport
        self.sink = sink
        self._try_send: Callable[[OutItem], bool] | None = getattr(sink, "try_send", None)
        self.max_outbox = max_outbox
        self.channels: set[str] = set()
        self.connected_at = time.time()
        self.last_seen = time.monotonic()
        self._outbox: deque[OutItem] | None = None
        self.closed = False
        self.close_code: int | None = None
        self.replaying = True
        self.held: list[tuple[OutItem, bool]] | None = None
        self.replayed_ids: Set[str] = _NO_IDS
        self.expiry_timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed_event: asyncio.Event | None = None

    @property
    def tenant_id(self) -> str:
        return self.identity.tenant_id

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    @property
    def outbox(self) -> deque[OutItem] | tuple[()]:
        """Frames waiting for the writer (empty while the socket keeps up)."""
        return self._outbox if self._outbox is not None else _EMPTY

    def push(self, item: OutItem, admitted: bool = False) -> bool:
        """Write or queue a frame; False if the connection is closed or just overflowed.

        ``admitted`` frames were already counted against the replay hold bound and
        are queued even past the outbox bound (so at most twice it in all).
        """
        if self.closed:
            return False
        outbox = self._outbox
        if not outbox and self._writer is None and self._try_send is not None:
            try:
                if self._try_send(item):
                    return True
            except Exception as exc:  # the peer went away
                log.debug("write to %s failed: %r", self.id, exc)
                self._mark_closed(CLOSE_GOING_AWAY)
                return False
        if outbox is None:
            outbox = self._outbox = deque()
        if len(outbox) >= self.max_outbox and not admitted:
            log.warning("slow consumer %s closed: outbox full", self.id)
            self.abort(CLOSE_SLOW_CONSUMER, "slow consumer")
            return False
        outbox.append(item)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        return True

    def push_live(self, item: OutItem, user_targeted: bool) -> bool:
        """Live traffic waits behind the offline replay; replayed ids are not sent twice."""
        if self.replaying:
            held = self.held
            if held is None:
                held = self.held = []
            if len(held) >= self.max_outbox:
                self.abort(CLOSE_SLOW_CONSUMER, "slow consumer")
                return False
            held.append((item, user_targeted))
            return True
        if user_targeted and item[1] in self.replayed_ids:
            return True
        return self.push(item)

    def finish_replay(self, replayed: Iterable[str]) -> None:
        ids = set(replayed)
        if ids:
            self.replayed_ids = ids | self.replayed_ids
        held, self.held = self.held, None
        self.replaying = False
        for item, user_targeted in held or ():
            if user_targeted and item[1] in self.replayed_ids:
                continue
            self.push(item, admitted=True)

    async def _drain(self) -> None:
        outbox = self._outbox
        try:
            while outbox and not self.closed:
                item = outbox.popleft()
                await self.sink.send(item)
        except Exception as exc:  # the peer went away mid-write
            log.debug("write to %s failed: %r", self.id, exc)
            self._mark_closed(CLOSE_GOING_AWAY)
        finally:
            self._writer = None
        if self._outbox and not self.closed:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    def abort(self, code: int, reason: str) -> None:
        """Close now, dropping whatever is still queued."""
        if self.closed:
            return
        if self._outbox is not None:
            self._outbox.clear()
        self._mark_closed(code)
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
        asyncio.get_running_loop().create_task(self._close_sink(code, reason))

    async def close_after_flush(self, code: int, reason: str, within: float = 5.0) -> None:
        """Let queued frames go out (for at most ``within`` seconds), then close."""
        deadline = time.monotonic() + within
        while (self.outbox or self._writer is not None) and not self.closed:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        if self.closed:
            return
        self._mark_closed(code)
        if self._writer is not None:
            self._writer.cancel()
        await self._close_sink(code, reason)

    async def _close_sink(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.sink.close(code, reason)

    def _mark_closed(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            self.close_code = code
            if self.expiry_timer is not None:
                self.expiry_timer.cancel()
            if self._closed_event is not None:
                self._closed_event.set()

    def peer_gone(self) -> None:
        """The transport saw the client leave."""
        self._mark_closed(CLOSE_GOING_AWAY)
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

    async def wait_closed(self) -> None:
        if self.closed:
            return
        if self._closed_event is None:
            self._closed_event = asyncio.Event()
        await self._closed_event.wait()
