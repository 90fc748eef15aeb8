"""WebSocket ``/ws`` frames and their replies (PROTOCOL §2), over a real socket."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

from conftest import EmbeddedServer, ServerFactory, eventually, ws_connect

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


async def send_channel(server: EmbeddedServer, channel: str, **extra: object) -> dict:
    body = {"channel": channel, "event_type": "chan.event", "payload": {"c": channel}, **extra}
    response = await server.post("/api/v1/notifications/channel", body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_connected_frame_names_connection_user_and_server(server: EmbeddedServer) -> None:
    async with server.ws("alice") as ws:
        hello = ws.hello
        assert set(hello) == {"type", "connection_id", "user_id", "server_id"}
        assert uuid.UUID(hello["connection_id"])
        assert hello["user_id"] == "alice"
        assert hello["server_id"] == "gw-test"
    async with server.ws("alice") as again:
        assert again.hello["connection_id"] != hello["connection_id"]


async def test_bearer_header_authenticates_like_the_query_token(server: EmbeddedServer) -> None:
    headers = {"Authorization": f"Bearer {server.token('bob')}"}
    async with ws_connect(server.ws_url(), headers=headers) as ws:
        assert ws.hello["user_id"] == "bob"


async def test_notification_frame_has_wire_fields_and_omits_empty_metadata(
    server: EmbeddedServer,
) -> None:
    async with server.ws("u1") as ws:
        full = await server.send_to_user(
            "u1", "order.created", {"order_id": "ORD-1"}, priority="High", ttl=3600,
            correlation_id="c-1",
        )
        frame = await ws.expect("notification")
        assert frame["id"] == full["notification_id"]
        assert set(frame) == {"type", "id", "occurred_at", "event_type", "payload", "metadata"}
        assert ISO_UTC.match(frame["occurred_at"])
        assert frame["event_type"] == "order.created"
        assert frame["payload"] == {"order_id": "ORD-1"}
        assert frame["metadata"] == {
            "source": "http-api", "priority": "High", "ttl": 3600, "correlation_id": "c-1",
        }
        await server.send_to_user("u1", "plain.event")
        plain = await ws.expect("notification")
        assert plain["metadata"] == {"source": "http-api", "priority": "Normal"}
        assert plain["payload"] == {}


async def test_ping_gets_pong(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        await ws.send_json({"type": "Ping"})
        assert await ws.recv() == {"type": "pong"}


async def test_subscribe_reports_valid_names_and_errors_on_invalid_ones(
    server: EmbeddedServer,
) -> None:
    async with server.ws("u1") as ws:
        await ws.send_json(
            {"type": "Subscribe", "payload": {"channels": ["orders", "bad name!", "alerts", 7]}}
        )
        subscribed = await ws.expect("subscribed")
        assert subscribed["payload"] == ["orders", "alerts"]
        error = await ws.expect("error")
        assert error["code"] == "SUBSCRIPTION_ERROR"
        assert "bad name!" in error["message"]
        result = await send_channel(server, "alerts")
        assert result["delivered_to"] == 1
        frame = await ws.expect("notification")
        assert frame["metadata"]["channel"] == "alerts"
        assert frame["payload"] == {"c": "alerts"}


async def test_subscribe_with_only_invalid_names_sends_only_an_error(
    server: EmbeddedServer,
) -> None:
    async with server.ws("u1") as ws:
        await ws.send_json({"type": "Subscribe", "payload": {"channels": ["x" * 65]}})
        error = await ws.expect("error")
        assert error["code"] == "SUBSCRIPTION_ERROR"
        await ws.send_json({"type": "Ping"})
        assert (await ws.recv())["type"] == "pong"


async def test_subscription_limit_subscribes_up_to_the_limit_and_errors_beyond(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(websocket_max_subscriptions_per_connection=2)
    async with server.ws("u1") as ws:
        await ws.send_json({"type": "Subscribe", "payload": {"channels": ["a", "b", "c"]}})
        assert (await ws.expect("subscribed"))["payload"] == ["a", "b"]
        error = await ws.expect("error")
        assert error["code"] == "SUBSCRIPTION_ERROR"
        assert "'c'" in error["message"]
        # Re-subscribing a channel it already has does not count against the limit.
        await ws.send_json({"type": "Subscribe", "payload": {"channels": ["a"]}})
        assert (await ws.expect("subscribed"))["payload"] == ["a"]
        assert (await send_channel(server, "c"))["delivered_to"] == 0
        assert (await send_channel(server, "b"))["delivered_to"] == 1
        assert (await ws.expect("notification"))["metadata"]["channel"] == "b"


async def test_unsubscribe_replies_and_stops_channel_delivery(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        await ws.send_json({"type": "Subscribe", "payload": {"channels": ["orders", "news"]}})
        await ws.expect("subscribed")
        await ws.send_json({"type": "Unsubscribe", "payload": {"channels": ["orders"]}})
        assert await ws.expect("unsubscribed") == {"type": "unsubscribed", "payload": ["orders"]}
        assert (await send_channel(server, "orders"))["delivered_to"] == 0
        assert (await send_channel(server, "news"))["delivered_to"] == 1
        frame = await ws.expect("notification")
        assert frame["metadata"]["channel"] == "news"
        await ws.send_json({"type": "Unsubscribe", "payload": {"channels": ["no way"]}})
        assert (await ws.expect("error"))["code"] == "SUBSCRIPTION_ERROR"


async def test_ack_of_a_delivered_notification_is_confirmed(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        sent = await server.send_to_user("u1")
        frame = await ws.expect("notification")
        await ws.ack(frame["id"])
        acked = await ws.expect("acked")
        assert acked == {"type": "acked", "notification_id": sent["notification_id"]}


async def test_ack_of_an_unknown_id_is_invalid_ack(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        await ws.ack(str(uuid.uuid4()))
        error = await ws.expect("error")
        assert error["code"] == "INVALID_ACK"
        await ws.send_json({"type": "Ping"})
        assert (await ws.recv())["type"] == "pong"


async def test_ack_of_another_users_notification_is_invalid_ack(server: EmbeddedServer) -> None:
    async with server.ws("owner") as owner, server.ws("thief") as thief:
        sent = await server.send_to_user("owner")
        await owner.expect("notification")
        await thief.ack(sent["notification_id"])
        error = await thief.expect("error")
        assert error["code"] == "INVALID_ACK"
        receipt = await server.get(f"/api/v1/notifications/{sent['notification_id']}")
        assert receipt.json()["acked_by"] == []
        assert receipt.json()["pending"] == ["owner"]


async def test_malformed_frames_get_invalid_message_and_the_socket_stays_open(
    server: EmbeddedServer,
) -> None:
    bad_frames = [
        "{not json",
        "[1, 2]",
        json.dumps({"payload": {}}),
        json.dumps({"type": "Dance"}),
        json.dumps({"type": "subscribe", "payload": {"channels": ["a"]}}),
        json.dumps({"type": "Subscribe"}),
        json.dumps({"type": "Subscribe", "payload": {"channels": "a"}}),
        json.dumps({"type": "Unsubscribe", "payload": {}}),
        json.dumps({"type": "Ack", "payload": {}}),
        json.dumps({"type": "Ack"}),
    ]
    async with server.ws("u1") as ws:
        for text in bad_frames:
            await ws.send_text(text)
            error = await ws.expect("error")
            assert error["code"] == "INVALID_MESSAGE", (text, error)
            assert error["message"]
        await ws.send_json({"type": "Ping"})
        assert (await ws.recv())["type"] == "pong"


async def test_binary_frame_gets_unsupported_format_and_the_socket_stays_open(
    server: EmbeddedServer,
) -> None:
    async with server.ws("u1") as ws:
        await ws.ws.send(b'{"type":"Ping"}')
        error = await ws.expect("error")
        assert error["code"] == "UNSUPPORTED_FORMAT"
        await ws.send_json({"type": "Ping"})
        assert (await ws.recv())["type"] == "pong"


async def test_frame_over_64_kib_closes_with_1009(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        await ws.send_json({"type": "Ping", "pad": "x" * 60_000})
        assert (await ws.recv())["type"] == "pong"
        await ws.send_text(json.dumps({"type": "Ping", "pad": "x" * (64 * 1024)}))
        assert await ws.wait_closed() == 1009


async def test_heartbeat_frames_arrive_at_the_configured_interval(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(websocket_heartbeat_interval=0.2)
    async with server.ws("u1") as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        beats = [await ws.recv_json(2) for _ in range(3)]
        assert beats == [{"type": "heartbeat"}] * 3
        assert loop.time() - start < 1.5


async def test_silent_connection_is_closed_after_the_idle_timeout(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(websocket_connection_timeout=0.6,
                                  websocket_heartbeat_interval=30)
    async with server.ws("talker") as talker, server.ws("silent") as silent:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def keep_talking() -> None:
            while loop.time() - start < 1.5:
                await talker.send_json({"type": "Ping"})
                await talker.expect("pong")
                await asyncio.sleep(0.1)

        talking = asyncio.create_task(keep_talking())
        code = await silent.wait_closed(within=3)
        assert code == 1000
        assert loop.time() - start >= 0.5
        await asyncio.wait_for(talking, 3)
        await talker.send_json({"type": "Ping"})
        assert (await talker.recv())["type"] == "pong"
    await eventually(lambda: len(server.node.manager) == 0)


async def test_connection_is_closed_with_4001_when_its_token_expires(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(jwt_leeway_seconds=0)
    async with server.ws("u1", ttl=2) as short, server.ws("u2", ttl=3600) as long:
        code = await short.wait_closed(within=4)
        assert code == 4001
        await long.send_json({"type": "Ping"})
        assert (await long.recv())["type"] == "pong"


async def test_client_messages_over_the_rate_get_rate_limited_and_socket_stays_open(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(ratelimit_ws_messages_per_second=2, ratelimit_ws_message_burst=3)
    async with server.ws("u1") as ws:
        for _ in range(6):
            await ws.send_json({"type": "Ping"})
        frames = [await ws.recv() for _ in range(6)]
        assert [f["type"] for f in frames[:3]] == ["pong"] * 3
        assert all(f["type"] == "error" and f["code"] == "RATE_LIMITED" for f in frames[3:])
        await asyncio.sleep(0.6)
        await ws.send_json({"type": "Ping"})
        assert (await ws.recv())["type"] == "pong"


async def test_channel_metadata_uses_the_subscribed_name_in_a_tenant(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(tenant_enabled=True)
    async with server.ws("u1", tenant="acme") as acme, server.ws("u1") as default:
        for ws in (acme, default):
            await ws.send_json({"type": "Subscribe", "payload": {"channels": ["orders"]}})
            await ws.expect("subscribed")
        response = await server.post(
            "/api/v1/notifications/channel",
            {"channel": "orders", "event_type": "e", "payload": {}},
            headers={"X-Tenant-ID": "acme"},
        )
        assert response.json()["delivered_to"] == 1
        frame = await acme.expect("notification")
        assert frame["metadata"]["channel"] == "orders"
        assert "acme" not in json.dumps(frame)
        await default.assert_silent(0.3)
