"""Server-Sent Events ``/sse`` and ``POST /sse/ack`` (PROTOCOL §3), over real HTTP."""

from __future__ import annotations

import re
import uuid

from conftest import EmbeddedServer, ServerFactory, eventually, sse_connect

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


async def test_stream_headers_forbid_caching_and_proxy_buffering(server: EmbeddedServer) -> None:
    async with server.sse("u1") as sse:
        headers = sse.response.headers
        assert headers["content-type"].split(";")[0] == "text/event-stream"
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"


async def test_connected_event_names_connection_user_and_server(server: EmbeddedServer) -> None:
    async with server.sse("u1") as sse:
        assert sse.hello is not None
        assert sse.hello.id is None
        data = sse.hello.data
        assert set(data) == {"type", "connection_id", "user_id", "server_id"}
        assert data["type"] == "connected"
        assert uuid.UUID(data["connection_id"])
        assert data["user_id"] == "u1"
        assert data["server_id"] == "gw-test"


async def test_bearer_header_authenticates_the_stream(server: EmbeddedServer) -> None:
    headers = {"Authorization": f"Bearer {server.token('hdr')}"}
    async with sse_connect(server.sse_url(), headers=headers) as sse:
        assert sse.hello is not None and sse.hello.data["user_id"] == "hdr"


async def test_notification_event_carries_its_id_and_the_websocket_frame(
    server: EmbeddedServer,
) -> None:
    async with server.sse("u1") as sse, server.ws("u1") as ws:
        sent = await server.send_to_user("u1", "order.created", {"order_id": "ORD-1"},
                                         priority="Critical", correlation_id="c-9")
        event = await sse.expect("notification")
        frame = await ws.expect("notification")
        assert event.id == sent["notification_id"]
        assert event.data == frame
        assert event.data["metadata"] == {
            "source": "http-api", "priority": "Critical", "correlation_id": "c-9",
        }
        assert event.raw.splitlines()[0] == f"id: {sent['notification_id']}"


async def test_channels_query_subscribes_at_connect(server: EmbeddedServer) -> None:
    async with server.sse("u1", channels="orders,alerts") as sse:
        response = await server.post(
            "/api/v1/notifications/channel",
            {"channel": "alerts", "event_type": "alert", "payload": {"level": 3}},
        )
        assert response.json()["delivered_to"] == 1
        event = await sse.expect("notification")
        assert event.data["metadata"]["channel"] == "alerts"
        assert event.data["payload"] == {"level": 3}
        subs = await server.get("/api/v1/users/u1/subscriptions")
        assert subs.json()["subscriptions"] == ["alerts", "orders"]
        none = await server.post(
            "/api/v1/notifications/channel",
            {"channel": "other", "event_type": "x", "payload": {}},
        )
        assert none.json()["delivered_to"] == 0


async def test_invalid_channels_query_is_rejected_before_the_stream_opens(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(websocket_max_subscriptions_per_connection=2)
    for channels in ("ok,bad name", "a" * 65, "a,b,c"):
        async with server.sse("u1", channels=channels, connected=False) as sse:
            assert sse.response.status_code == 422, channels
            await sse.response.aread()
            error = sse.response.json()["error"]
            assert error["code"] == "SUBSCRIPTION_ERROR"
            assert error["details"]["field"] == "channels"
    assert len(server.node.manager) == 0


async def test_heartbeat_event_carries_a_timestamp(server_factory: ServerFactory) -> None:
    server = await server_factory(websocket_heartbeat_interval=0.2)
    async with server.sse("u1") as sse:
        beat = await sse.expect("heartbeat", within=2)
        assert beat.data["type"] == "heartbeat"
        assert ISO_UTC.match(beat.data["timestamp"])
        assert (await sse.expect("heartbeat", within=2)).event == "heartbeat"


async def test_sse_ack_confirms_and_shows_in_the_receipt(server: EmbeddedServer) -> None:
    async with server.sse("u1") as sse:
        sent = await server.send_to_user("u1")
        event = await sse.expect("notification")
        async with server.http(headers={"Authorization": f"Bearer {server.token('u1')}"}) as h:
            response = await h.post("/sse/ack", json={"notification_id": event.id})
        assert response.status_code == 200
        assert response.json()["notification_id"] == sent["notification_id"]
        assert response.json()["success"] is True
        receipt = (await server.get(f"/api/v1/notifications/{event.id}")).json()
        assert [a["user_id"] for a in receipt["acked_by"]] == ["u1"]
        assert receipt["pending"] == []


async def test_sse_ack_refuses_unknown_and_foreign_ids(server: EmbeddedServer) -> None:
    sent = await server.send_to_user("owner")
    url = f"/sse/ack?token={server.token('thief')}"
    for notification_id in (str(uuid.uuid4()), sent["notification_id"]):
        response = await server.post(url, {"notification_id": notification_id})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "INVALID_ACK"
    malformed = await server.client.post(url, content=b"{nope",  # type: ignore[union-attr]
                                         headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "INVALID_JSON"
    missing = await server.post(url, {})
    assert missing.status_code == 422
    assert missing.json()["error"]["details"]["field"] == "notification_id"


async def test_closing_the_stream_forgets_the_connection(server: EmbeddedServer) -> None:
    async with server.sse("u1", channels="news"):
        assert len(server.node.manager) == 1
    await eventually(lambda: len(server.node.manager) == 0)
    result = await server.send_to_user("u1")
    assert result["delivered_to"] == 0
    assert result["queued"] is True


async def test_stream_ends_when_the_token_expires(server_factory: ServerFactory) -> None:
    server = await server_factory(jwt_leeway_seconds=0)
    async with server.sse("u1", ttl=2) as sse:
        events = await sse.wait_end(within=4)
        assert [e.event for e in events] == ["error"]
        assert events[0].data["code"] == "TOKEN_EXPIRED"
    await eventually(lambda: len(server.node.manager) == 0)
