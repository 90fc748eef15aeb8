"""Connection limits, rate limits and the slow-consumer rule (PROTOCOL §2, §3, §7)."""

from __future__ import annotations

import asyncio
import contextlib

from conftest import (
    EmbeddedServer,
    ServerFactory,
    eventually,
    sse_connect,
    ws_connect,
    ws_connect_stalled,
    ws_rejection,
)


async def expect_refused_with_4029(server: EmbeddedServer, sub: str, **kwargs: object) -> str:
    """Connect, expect a CONNECTION_LIMIT error frame and then close 4029."""
    async with ws_connect(server.ws_url(server.token(sub, **kwargs)), connected=False) as ws:
        frame = await ws.recv_json()
        assert frame["type"] == "error"
        assert frame["code"] == "CONNECTION_LIMIT"
        assert await ws.wait_closed() == 4029
        return str(frame["message"])


async def test_total_connection_limit_sends_connection_limit_then_closes_4029(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(websocket_max_connections=2)
    async with server.ws("a"), server.ws("b") as b:
        message = await expect_refused_with_4029(server, "c")
        assert "server" in message
        await b.close()
        await eventually(lambda: len(server.node.manager) == 1)
        async with server.ws("c") as c:
            assert c.hello["user_id"] == "c"


async def test_per_user_connection_limit_refuses_only_that_user(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(websocket_max_connections_per_user=2)
    async with server.ws("u1"), server.ws("u1"):
        message = await expect_refused_with_4029(server, "u1")
        assert "per-user" in message
        async with server.ws("u2") as other:
            assert other.hello["user_id"] == "u2"
        async with server.sse("u1", connected=False) as sse:
            assert sse.response.status_code == 429
            await sse.response.aread()
            assert sse.response.json()["error"]["code"] == "CONNECTION_LIMIT"


async def test_per_tenant_connection_limit_refuses_only_that_tenant(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(websocket_max_connections_per_tenant=1)
    async with server.ws("u1", tenant="acme"):
        message = await expect_refused_with_4029(server, "u2", tenant="acme")
        assert "tenant" in message
        async with server.ws("u2", tenant="other") as ws:
            assert ws.hello["user_id"] == "u2"


async def test_connection_attempts_over_the_per_minute_rate_get_429_before_upgrade(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(
        ratelimit_ws_connections_per_minute=2, ratelimit_http_requests_per_second=1000,
    )
    for _ in range(2):
        async with server.ws("eager"):
            pass
    refused = await ws_rejection(server.ws_url(server.token("eager")))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["details"]["retry_after_seconds"] >= 1
    async with sse_connect(server.sse_url(server.token("eager")), connected=False) as sse:
        assert sse.response.status_code == 429
    async with server.ws("patient") as ws:
        assert ws.hello["user_id"] == "patient"


async def test_rest_requests_over_the_rate_get_429_with_retry_after(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(
        ratelimit_http_requests_per_second=0.5, ratelimit_http_burst_size=2,
    )
    statuses = [(await server.get("/api/v1/channels")).status_code for _ in range(2)]
    assert statuses == [200, 200]
    limited = await server.get("/api/v1/channels")
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "RATE_LIMITED"
    assert limited.json()["error"]["details"]["retry_after_seconds"] >= 1
    assert int(limited.headers["Retry-After"]) >= 1
    # Health probes are never rate limited.
    for _ in range(5):
        assert (await server.get("/health")).status_code == 200


async def test_slow_consumer_is_closed_with_4008_and_others_keep_receiving(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(websocket_send_queue_size=8)
    blob = "x" * 50_000
    sent = 0
    async with ws_connect_stalled(server.ws_url(server.token("slow"))) as stalled, \
            server.ws("fast") as fast:
        slow = stalled.ws
        for ws in (slow, fast.ws):
            await ws.send('{"type":"Subscribe","payload":{"channels":["firehose"]}}')
        await fast.expect("subscribed")
        await eventually(lambda: server.node.manager.channel_count("default", "firehose") == 2)

        def slow_conn_closed() -> bool:
            conns = [c for c in server.node.manager.by_id.values() if c.user_id == "slow"]
            return not conns or conns[0].closed

        received = 0
        while not slow_conn_closed():
            assert sent < 2000, "the stalled client was never cut off"
            items = [
                {"target": {"type": "channel", "value": "firehose"}, "event_type": "big",
                 "payload": {"n": sent + i, "blob": blob}}
                for i in range(10)
            ]
            response = await server.post("/api/v1/notifications/batch",
                                         {"notifications": items})
            assert response.status_code == 200
            sent += 10
            # The fast client reads everything as it comes.
            for frame in await fast.notifications(10):
                assert frame["payload"]["n"] == received
                received += 1
        conns = [c for c in server.node.manager.by_id.values() if c.user_id == "slow"]
        assert not conns or conns[0].close_code == 4008
        # Once the stalled client reads again it sees the 4008 close after the backlog.
        frames = 0

        async def drain() -> None:
            nonlocal frames
            with contextlib.suppress(Exception):
                while True:
                    await slow.recv()
                    frames += 1

        await asyncio.wait_for(drain(), 10)
        assert slow.protocol.close_rcvd is not None
        assert slow.protocol.close_rcvd.code == 4008
        assert frames < sent
        # The process and the other client are fine.
        response = await server.post(
            "/api/v1/notifications/channel",
            {"channel": "firehose", "event_type": "after", "payload": {}},
        )
        assert response.json()["delivered_to"] == 1
        assert (await fast.expect("notification"))["event_type"] == "after"
        assert (await server.get("/health")).json()["status"] == "healthy"
    await eventually(lambda: len(server.node.manager) == 0)
    metrics = (await server.get("/metrics")).text
    assert "ara_slow_consumers_total 1.0" in metrics
