"""Probes, metrics, OpenAPI and the read-side REST endpoints (PROTOCOL §4)."""

from __future__ import annotations

import re
from typing import Any

from conftest import EmbeddedServer, ServerFactory, WsClient, eventually
from prometheus_client.parser import text_string_to_metric_families

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
SEND_PATHS = [
    "/api/v1/notifications/send",
    "/api/v1/notifications/send-to-users",
    "/api/v1/notifications/broadcast",
    "/api/v1/notifications/channel",
    "/api/v1/notifications/channels",
    "/api/v1/notifications/batch",
]


async def subscribe(ws: WsClient, *channels: str) -> None:
    await ws.send_json({"type": "Subscribe", "payload": {"channels": list(channels)}})
    await ws.expect("subscribed")


async def test_health_reports_status_version_uptime_and_connections(
    server: EmbeddedServer,
) -> None:
    async with server.ws("a"), server.sse("b"):
        body = (await server.get("/health")).json()
    assert body["status"] == "healthy"
    assert isinstance(body["version"], str) and body["version"]
    assert body["uptime_seconds"] >= 0
    assert body["connections"] == {"total": 2, "websocket": 1, "sse": 1}
    assert body["redis"] == {"status": "not_configured"}
    assert body["postgres"] == {"status": "not_configured"}


async def test_ready_is_200_while_serving(server: EmbeddedServer) -> None:
    response = await server.get("/ready")
    assert response.status_code == 200
    assert response.json()["ready"] is True


async def test_metrics_are_prometheus_text_with_ara_names(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        await server.send_to_user("u1")
        await ws.expect("notification")
        await ws.send_text("garbage")
        await ws.expect("error")
        response = await server.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families
    assert all(name.startswith("ara_") for name in families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("ara_connections", (("transport", "websocket"),))] == 1
    assert samples[("ara_notifications_total", (("source", "http-api"), ("target", "user")))] == 1
    assert samples[("ara_client_errors_total", (("code", "INVALID_MESSAGE"),))] == 1


async def test_openapi_is_3_1_and_lists_the_send_paths(server: EmbeddedServer) -> None:
    response = await server.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"]
    for path in SEND_PATHS:
        assert "post" in doc["paths"][path], path
        assert doc["paths"][path]["post"]["requestBody"]["required"] is True
    assert "/api/v1/templates/{template_id}" in doc["paths"]
    schemas = doc["components"]["schemas"]

    def refs(value: Any) -> list[str]:
        if isinstance(value, dict):
            found = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
            return found + [r for v in value.values() for r in refs(v)]
        if isinstance(value, list):
            return [r for v in value for r in refs(v)]
        return []

    all_refs = refs(doc)
    assert all_refs
    for ref in all_refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref
    send_schema = schemas["SendRequest"]
    assert "target_user_id" in send_schema["properties"]


async def test_channel_list_and_detail_count_subscribers(server: EmbeddedServer) -> None:
    async with server.ws("a") as a, server.ws("b") as b:
        await subscribe(a, "orders", "alerts")
        await subscribe(b, "orders")
        listed = (await server.get("/api/v1/channels")).json()
        assert listed == {
            "channels": [{"name": "alerts", "subscriber_count": 1},
                         {"name": "orders", "subscriber_count": 2}],
            "total_channels": 2,
        }
        detail = (await server.get("/api/v1/channels/orders")).json()
        assert detail == {"name": "orders", "subscriber_count": 2, "nodes": ["gw-test"]}
    await eventually(lambda: len(server.node.manager) == 0)
    gone = await server.get("/api/v1/channels/orders")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "CHANNEL_NOT_FOUND"
    assert (await server.get("/api/v1/channels")).json()["total_channels"] == 0


async def test_unknown_channel_is_404_channel_not_found(server: EmbeddedServer) -> None:
    for name in ("never-used", "bad%20name"):
        response = await server.get(f"/api/v1/channels/{name}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "CHANNEL_NOT_FOUND"


async def test_user_subscriptions_lists_channels_of_all_connections(
    server: EmbeddedServer,
) -> None:
    async with server.ws("u1") as a, server.sse("u1", channels="news"):
        await subscribe(a, "orders")
        body = (await server.get("/api/v1/users/u1/subscriptions")).json()
        assert body == {"user_id": "u1", "connection_count": 2,
                        "subscriptions": ["news", "orders"]}
    missing = await server.get("/api/v1/users/u1/subscriptions")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "USER_NOT_CONNECTED"


async def test_stats_count_connections_users_channels_and_sends(server: EmbeddedServer) -> None:
    async with server.ws("a") as a, server.ws("a"), server.sse("b"):
        await subscribe(a, "orders")
        await server.send_to_user("a")
        await server.send_to_user("offline")
        body = (await server.get("/api/v1/stats")).json()
        alias = (await server.get("/stats")).json()
    assert body["connections"] == {"total": 3, "websocket": 2, "sse": 1}
    assert body["users"] == 2
    assert body["channels"] == 1
    assert body["notifications"] == {"sent": 2, "delivered": 2, "failed": 0, "queued": 1}
    assert set(body["acks"]) == {"pending", "acknowledged", "expired", "average_ack_time_ms"}
    assert alias["connections"] == body["connections"]
    assert alias["notifications"] == body["notifications"]


async def test_receipt_shows_target_delivery_and_acks(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        response = await server.post("/api/v1/notifications/send-to-users", {
            "target_user_ids": ["u1", "u2"], "event_type": "r", "payload": {},
        })
        notification_id = response.json()["notification_id"]
        await ws.expect("notification")
        before = (await server.get(f"/api/v1/notifications/{notification_id}")).json()
        assert before["notification_id"] == notification_id
        assert before["target"] == {"type": "users", "value": ["u1", "u2"]}
        assert ISO_UTC.match(before["created_at"])
        assert before["delivered_to"] == 1
        assert before["acked_by"] == []
        assert before["pending"] == ["u1", "u2"]
        await ws.ack(notification_id)
        await ws.expect("acked")
        after = (await server.get(f"/api/v1/notifications/{notification_id}")).json()
        assert len(after["acked_by"]) == 1
        ack = after["acked_by"][0]
        assert ack["user_id"] == "u1"
        assert ack["connection_id"] == ws.hello["connection_id"]
        assert ISO_UTC.match(ack["acked_at"])
        assert after["pending"] == ["u2"]
    missing = await server.get("/api/v1/notifications/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOTIFICATION_NOT_FOUND"


async def test_ack_stats_count_acknowledged_and_pending(server: EmbeddedServer) -> None:
    empty = (await server.get("/api/v1/stats/acks")).json()
    assert empty == {"pending": 0, "acknowledged": 0, "expired": 0, "average_ack_time_ms": 0.0}
    async with server.ws("u1") as ws:
        first = await server.send_to_user("u1")
        await server.send_to_user("u1")
        await ws.notifications(2)
        await ws.ack(first["notification_id"])
        await ws.expect("acked")
        # A second ACK of the same id is accepted and changes nothing.
        await ws.ack(first["notification_id"])
        await ws.expect("acked")
    stats = (await server.get("/api/v1/stats/acks")).json()
    assert stats["acknowledged"] == 1
    assert stats["pending"] == 1
    assert stats["expired"] == 0
    assert stats["average_ack_time_ms"] > 0


async def test_ack_stats_count_unacknowledged_past_the_timeout_as_expired(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(ack_timeout_seconds=1)
    async with server.ws("u1") as ws:
        await server.send_to_user("u1")
        await ws.expect("notification")
    await eventually(
        lambda: _expired(server), within=3, interval=0.1,
    )


async def _expired(server: EmbeddedServer) -> bool:
    stats = (await server.get("/api/v1/stats/acks")).json()
    return bool(stats["expired"] == 1 and stats["pending"] == 0)


async def test_cluster_views_describe_the_single_node(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        await subscribe(ws, "orders")
        status = (await server.get("/api/v1/cluster/status")).json()
        assert status["node_id"] == "gw-test"
        assert status["healthy_nodes"] == 1
        assert status["total_connections"] == 1
        assert [n["node_id"] for n in status["nodes"]] == ["gw-test"]
        assert status["partitions"] == 64
        user = (await server.get("/api/v1/cluster/users/u1")).json()
        assert user["user_id"] == "u1"
        assert user["found"] is True
        [session] = user["sessions"]
        assert session["connection_id"] == ws.hello["connection_id"]
        assert session["node_id"] == "gw-test"
        assert session["transport"] == "websocket"
        assert session["channels"] == ["orders"]
        assert ISO_UTC.match(session["connected_at"])
    nobody = (await server.get("/api/v1/cluster/users/u1")).json()
    assert nobody == {"user_id": "u1", "found": False, "sessions": []}


async def test_tenant_views_count_only_their_tenant(server_factory: ServerFactory) -> None:
    server = await server_factory(tenant_enabled=True)
    async with server.ws("a", tenant="acme"), server.ws("b", tenant="acme"), server.ws("c"):
        acme = (await server.get("/api/v1/tenants/acme")).json()
        assert acme["tenant_id"] == "acme"
        assert acme["connections"] == 2
        assert acme["users"] == 2
        listed = (await server.get("/api/v1/tenants")).json()
        assert {t["tenant_id"] for t in listed["tenants"]} == {"acme", "default"}
        scoped = (await server.get("/api/v1/stats", headers={"X-Tenant-ID": "acme"})).json()
        assert scoped["connections"]["total"] == 2
        default = (await server.get("/api/v1/stats")).json()
        assert default["connections"]["total"] == 1
        missing = await server.get("/api/v1/users/c/subscriptions",
                                   headers={"X-Tenant-ID": "acme"})
        assert missing.status_code == 404
