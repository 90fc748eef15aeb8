"""Lightweight load-generating clients: raw WebSocket, SSE and HTTP/1.1 on asyncio.

These are deliberately thin ``asyncio.Protocol`` classes instead of full
client libraries, so that one client process on one core can hold
thousands of sockets and receive faster than the server under test sends:
a received WebSocket frame costs a header parse and a counter increment.
They answer pings and close frames, and mask what they send (RFC 6455).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable
from typing import Any, cast

NOTIFICATION_PREFIX = b'{"type":"notification"'


class Tally:
    """Shared counters of one client process, with a waitable threshold."""

    __slots__ = ("_event", "_target", "frames", "notifications")

    def __init__(self) -> None:
        self.frames = 0
        self.notifications = 0
        self._target = 1 << 62
        self._event: asyncio.Event | None = None

    def hit(self) -> None:
        self.notifications += 1
        if self.notifications >= self._target and self._event is not None:
            self._event.set()

    async def wait_for(self, count: int, timeout: float) -> bool:  # noqa: ASYNC109
        if self.notifications >= count:
            return True
        self._target = count
        self._event = asyncio.Event()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._target = 1 << 62
            self._event = None


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    if n == 0:
        return key
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return key + masked


def client_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _mask(payload)


class WsClient(asyncio.Protocol):
    """One WebSocket connection; counts notification frames into a ``Tally``."""

    def __init__(
        self,
        path: str,
        host: str,
        tally: Tally,
        on_text: Callable[[WsClient, bytes], None] | None = None,
    ) -> None:
        self.path = path
        self.host = host
        self.tally = tally
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.open = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.texts: list[bytes] = []
        self.keep_texts = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            del buf[: end + 4]
            self.open = True
            if not self.opened.done():
                self.opened.set_result(None)
        pos = 0
        size = len(buf)
        tally = self.tally
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > size:
                break
            opcode = b0 & 0x0F
            if opcode == 1:
                tally.frames += 1
                if buf.startswith(NOTIFICATION_PREFIX, pos + head):
                    tally.hit()
                    if self.on_text is not None:
                        self.on_text(self, bytes(buf[pos + head : end]))
                elif self.keep_texts:
                    self.texts.append(bytes(buf[pos + head : end]))
            elif opcode == 9:
                self.send_frame(10, bytes(buf[pos + head : end]))
            elif opcode == 8:
                code = (buf[pos + head] << 8 | buf[pos + head + 1]) if length >= 2 else 1005
                self.send_frame(8, struct.pack("!H", code) if length >= 2 else b"")
                if not self.closed.done():
                    self.closed.set_result(code)
                assert self.transport is not None
                self.transport.close()
            pos = end
        if pos:
            del buf[:pos]

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def send_text(self, text: str | bytes) -> None:
        self.send_frame(1, text.encode() if isinstance(text, str) else text)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(1006)

    async def next_text(self, timeout: float = 10.0) -> bytes:  # noqa: ASYNC109
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.texts:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("no frame")
            if self.closed.done():
                raise ConnectionError(f"closed {self.closed.result()}")
            await asyncio.sleep(0.002)
        return self.texts.pop(0)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send_frame(8, struct.pack("!H", 1000))
            self.transport.close()


class SseClient(asyncio.Protocol):
    """One SSE stream; counts ``event: notification`` blocks."""

    def __init__(self, path: str, host: str, tally: Tally) -> None:
        self.path = path
        self.host = host
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.open = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.got_connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: text/event-stream\r\n\r\n"
            .encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:end]).split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            del self.buf[: end + 4]
            self.open = True
            self.opened.set_result(None)
        count = self.buf.count(b"event: notification")
        if count:
            for _ in range(count):
                self.tally.hit()
        if b"event: connected" in self.buf and not self.got_connected.done():
            self.got_connected.set_result(None)
        # keep only a tail that could hold a split marker
        if len(self.buf) > 64:
            del self.buf[:-32]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_many(
    factory: Callable[[int], asyncio.Protocol],
    count: int,
    port: int,
    concurrency: int = 200,
    handshake: Callable[[Any], Any] | None = None,
) -> list[Any]:
    """Open ``count`` connections, ``concurrency`` at a time; returns the protocols."""
    loop = asyncio.get_running_loop()
    result: list[Any] = [None] * count
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            for attempt in range(5):
                try:
                    _, proto = await loop.create_connection(lambda: factory(i), "127.0.0.1", port)
                    await asyncio.wait_for(proto.opened, 30)
                    if handshake is not None:
                        await handshake(proto)
                    result[i] = proto
                    return
                except (OSError, ConnectionError, TimeoutError):
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(one(i) for i in range(count)))
    return result


class HttpClient(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection doing one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buf[:end]).lower()
        status = int(head[9:12])
        length = 0
        i = head.find(b"content-length:")
        if i >= 0:
            stop = head.find(b"\r\n", i)
            length = int(head[i + 15 : stop if stop > 0 else None])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("closed"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def http_request(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def http_connect(port: int) -> HttpClient:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(HttpClient, "127.0.0.1", port)
    await proto.ready
    return proto
