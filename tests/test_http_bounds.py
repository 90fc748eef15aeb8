"""The gateway's HTTP protocol bounds request heads and their read time.

The gateway runs uvicorn's httptools protocol (faster than h11) behind
``BoundedHttpToolsProtocol``; these pin what it must refuse or cut, and what it
must leave alone (bodies, WebSockets, keep-alive connections between requests).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from conftest import TEST_API_KEY, EmbeddedServer

from gateway.httpproto import MAX_HEAD_BYTES, BoundedHttpToolsProtocol

SHORT_TIMEOUT = 0.6


@pytest.fixture
def short_read_timeout() -> Iterator[None]:
    original = BoundedHttpToolsProtocol.read_timeout
    BoundedHttpToolsProtocol.read_timeout = SHORT_TIMEOUT
    try:
        yield
    finally:
        BoundedHttpToolsProtocol.read_timeout = original


@contextlib.asynccontextmanager
async def raw_connection(
    server: EmbeddedServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_all(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), within)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_a_head_trickled_past_the_bound_gets_431(server: EmbeddedServer) -> None:
    async with raw_connection(server) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent <= MAX_HEAD_BYTES + 1024:
                writer.write(b"a" * 512)
                await writer.drain()
                sent += 512
                await asyncio.sleep(0)
        answer = await read_all(reader)
    assert status_of(answer) == 431


async def test_many_headers_in_one_write_get_431_before_the_app(server: EmbeddedServer) -> None:
    before = server.app.state.node.metrics.http_requests.labels("health", "200")._value.get()
    async with raw_connection(server) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\n" + b"X-Many: a\r\n" * 2000 + b"\r\n")
        answer = await read_all(reader)
    assert status_of(answer) == 431
    after = server.app.state.node.metrics.http_requests.labels("health", "200")._value.get()
    assert after == before


async def test_an_oversized_websocket_upgrade_gets_431(server: EmbeddedServer) -> None:
    async with raw_connection(server) as (reader, writer):
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     + b"X-Many: a\r\n" * 2000 + b"\r\n")
        answer = await read_all(reader)
    assert status_of(answer) == 431


async def test_an_oversized_head_with_its_body_in_the_same_write_gets_431(
    server: EmbeddedServer,
) -> None:
    body = b'{"target_user_id": "u1", "event_type": "e", "payload": {}}'
    async with raw_connection(server) as (reader, writer):
        writer.write(b"POST /api/v1/notifications/send HTTP/1.1\r\nHost: x\r\n"
                     b"X-API-Key: " + TEST_API_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                     + b"X-Many: a\r\n" * 2000 + b"\r\n" + body)
        answer = await read_all(reader)
    assert status_of(answer) == 431


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "head-then-body"])
async def test_a_large_body_under_a_small_head_is_not_mistaken_for_a_big_head(
    server: EmbeddedServer, split: bool,
) -> None:
    body = b'{"target_user_id": "u1", "event_type": "big", "payload": {"pad": "' + \
        b"x" * 60_000 + b'"}}'
    head = (b"POST /api/v1/notifications/send HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"X-API-Key: " + TEST_API_KEY.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    async with raw_connection(server) as (reader, writer):
        if split:  # the body's last chunk then holds no head bytes at all
            writer.write(head)
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(body)
        else:
            writer.write(head + body)
        answer = await read_all(reader)
    assert status_of(answer) == 200, answer[:300]


async def test_a_stalled_head_gets_408_and_the_connection_closes(
    short_read_timeout: None, server: EmbeddedServer,
) -> None:
    async with raw_connection(server) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        answer = await read_all(reader, within=SHORT_TIMEOUT * 8)
    assert status_of(answer) == 408


async def test_a_stalled_body_is_cut(short_read_timeout: None, server: EmbeddedServer) -> None:
    async with raw_connection(server) as (reader, writer):
        writer.write(b"POST /api/v1/notifications/send HTTP/1.1\r\nHost: x\r\n"
                     b"X-API-Key: " + TEST_API_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\"")
        answer = await read_all(reader, within=SHORT_TIMEOUT * 8)
    # Closed by the server; whatever it managed to say is an error, never a 200.
    assert not answer.startswith(b"HTTP/1.1 200")


async def test_keep_alive_connections_may_idle_between_requests(
    short_read_timeout: None, server: EmbeddedServer,
) -> None:
    async with raw_connection(server) as (reader, writer):
        for _ in range(2):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert status_of(head) == 200
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            await asyncio.sleep(SHORT_TIMEOUT * 2)


async def test_websockets_outlive_the_read_deadline(
    short_read_timeout: None, server: EmbeddedServer,
) -> None:
    async with server.ws("u1") as ws:
        await asyncio.sleep(SHORT_TIMEOUT * 3)
        await ws.send_json({"type": "Ping"})
        assert (await ws.expect("pong"))["type"] == "pong"
