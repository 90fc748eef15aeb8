"""The WebSocket transport under uvicorn, trimmed for fan-out.

uvicorn's ``websockets-sansio`` protocol is kept (handshake, parsing, pings,
close handshake, flow control all stay uvicorn's and ``websockets``'), with
three changes that matter when one process holds thousands of sockets and
writes the same notification to all of them:

- **Synchronous, pre-encoded writes.** ``write_text`` puts a text frame on
  the transport at once when the socket is below its write high-water mark
  (no task, no ASGI message dict, no ``await``). Without compression a
  server frame is the same bytes for every socket, so the frame of the
  last text written is cached by identity: a broadcast encodes its frame
  once, not once per socket. With per-message-deflate the frame is built per
  socket by ``websockets`` as before.
- **Lighter per-connection state.** The inbound ASGI queue and the
  ``writable`` flag are small slotted objects that allocate their deque /
  future only when used, and the handshake request/response objects are
  released once the socket is open.
- **Reachable from the app.** The protocol object is published in the ASGI
  scope as ``scope["extensions"]["ara.websocket"]``; ``gateway.ws`` uses it
  when present and falls back to plain ASGI messages otherwise (another
  server, the test client).

``compatible()`` checks that the uvicorn in use still has the attributes
relied on; ``gateway.server`` uses the stock protocol if it does not.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

EXTENSION = "ara.websocket"

_OPEN = State.OPEN


class FrameCache:
    """The encoded text frame of the last string written, reused while it is the same object."""

    __slots__ = ("frame", "text")

    def __init__(self) -> None:
        self.text: str | None = None
        self.frame = b""

    def encode(self, text: str) -> bytes:
        if text is self.text:
            return self.frame
        data = text.encode()
        n = len(data)
        if n < 126:
            head = bytes((0x81, n))
        elif n < 65536:
            head = struct.pack("!BBH", 0x81, 126, n)
        else:
            head = struct.pack("!BBQ", 0x81, 127, n)
        self.text = text
        self.frame = head + data
        return self.frame


FRAMES = FrameCache()


class Inbox:
    """Single-consumer stand-in for the ``asyncio.Queue`` of inbound ASGI events."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    async def get(self) -> Any:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an idle socket keeps no deque block
        return item


class Writable:
    """Stand-in for the ``asyncio.Event`` uvicorn uses as its write flow-control flag."""

    __slots__ = ("_flag", "_waiters")

    def __init__(self) -> None:
        self._flag = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> bool:
        if self._flag:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


class FastWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with a synchronous pre-encoded write path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Writable()  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The scope holds its own copy of the headers; the parsed request stays
        # referenced by the websockets parser for the socket's life, so empty it.
        self.request = None  # type: ignore[assignment]
        event.headers.clear()
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = self

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            self.response = None  # type: ignore[assignment]

    def write_text(self, text: str) -> bool:
        """Write one text message now; False when the socket is over its high-water
        mark (wait for ``writable``). Raises ``ClientDisconnected`` once it is gone."""
        if (
            self.disconnected
            or self.close_sent
            or not self.handshake_complete
            or self.initial_response is not None
            or self.conn.state is not _OPEN
        ):
            raise ClientDisconnected()
        if not self.writable.is_set():
            return False
        if self.conn.extensions:
            self.conn.send_text(text.encode())
            self.transport.write(b"".join(self.conn.data_to_send()))
        else:
            self.transport.write(FRAMES.encode(text))
        return True

    async def wait_writable(self) -> None:
        await self.writable.wait()


_SET_IN_INIT = (
    "disconnected", "close_sent", "handshake_complete", "initial_response", "conn", "transport",
    "queue", "writable",
)


def compatible() -> bool:
    """Whether this uvicorn's protocol still has what ``FastWebSocketProtocol`` relies on."""
    try:
        init_names = WebSocketsSansIOProtocol.__init__.__code__.co_names
        connect_names = WebSocketsSansIOProtocol.handle_connect.__code__.co_names
        send_names = WebSocketsSansIOProtocol.send.__code__.co_names
    except AttributeError:
        return False
    return (
        all(name in init_names for name in _SET_IN_INIT)
        and "scope" in connect_names
        and "writable" in send_names
        and "request" in connect_names
        and "response" in send_names
    )
