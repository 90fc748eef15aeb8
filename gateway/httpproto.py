"""uvicorn's httptools HTTP protocol with the bounds a public edge needs.

httptools parses a request several times faster than h11 (docs/benchmarks.md),
but uvicorn's protocol around it accepts a request line and headers of any
size and waits for them forever. This subclass refuses a request head larger
than ``max_head_bytes`` with 431 and a request whose head and body have not
arrived within ``read_timeout`` seconds with 408, both before the app runs, so
a flood of header bytes or a slowloris client costs one bounded buffer and
one timer, not memory or an fd for good.

The bytes of a head are counted as they arrive (from the first byte after the
previous request ended to the end of the headers), so a head split over many
small packets is bounded as well as one sent in a single write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 16 * 1024  # h11's default bound, which the gateway used before
READ_TIMEOUT_SECONDS = 10.0
# After a refusal the rest of what the client sends is read and dropped for this long
# before the connection closes: closing with unread bytes would send a reset, and the
# client could lose the answer explaining the refusal.
LINGER_SECONDS = 1.0


def _reply(status: bytes, message: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(message)).encode() + b"\r\nconnection: close\r\n\r\n"
        + message
    )


HEAD_TOO_LARGE = _reply(b"431 Request Header Fields Too Large", b"Request head too large.")
READ_TIMED_OUT = _reply(b"408 Request Timeout", b"Request not received in time.")


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a request-head size bound and a read deadline."""

    max_head_bytes = MAX_HEAD_BYTES
    read_timeout = READ_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # waiting for (the rest of) a request head
        self._raw_head = 0  # bytes of the chunks that ended inside the head
        self._parsed_head = 0  # bytes of the request line and headers parsed so far
        self._too_large = False
        self._refused = False
        self._marks = 0  # heads and messages completed on this connection
        self._deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head and self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._timed_out)
        marks_before = self._marks
        super().data_received(data)
        if self._in_head and self._marks == marks_before:
            # The whole chunk belongs to a head that is not complete yet, which
            # httptools buffers: count it. (When a head or a message ended inside the
            # chunk, the next head's start in it is at most one chunk, counted when
            # parsed.)
            self._raw_head += len(data)
        if self._too_large or (self._in_head and self._raw_head > self.max_head_bytes):
            self._refuse(HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._raw_head = self._parsed_head = 0

    def on_url(self, url: bytes) -> None:
        self._parsed_head += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_head += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._marks += 1
        if self._parsed_head > self.max_head_bytes:
            self._too_large = True  # refused by data_received; the app never runs
            return
        self._in_head = False
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return  # the body of a refused head: no request cycle was started
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._marks += 1
        if self._too_large:
            return
        self._in_head = True
        self._raw_head = 0
        self._cancel_deadline()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._cancel_deadline()
        if self._too_large:
            # An upgrade request whose head is over the bound: uvicorn never parsed it
            # into a scope (on_headers_complete stopped), so data_received refuses it.
            return
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(READ_TIMED_OUT)
        else:
            # The body stalls: the app (if it already runs) sees a disconnect.
            self.transport.close()

    def _refuse(self, reply: bytes) -> None:
        self._cancel_deadline()
        self._refused = True
        transport = self.transport
        if transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request behind one still being answered: no room for a reply.
            transport.close()
            return
        transport.write(reply)
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, transport.close)
