"""REST send endpoints, their answers and error bodies (PROTOCOL §4, §7)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

import pytest
from conftest import EmbeddedServer, WsClient

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
SEND = "/api/v1/notifications/send"


def assert_base_fields(body: dict[str, Any]) -> None:
    for key in ("success", "notification_id", "delivered_to", "failed", "timestamp"):
        assert key in body, key
    assert uuid.UUID(body["notification_id"])
    assert ISO_UTC.match(body["timestamp"])
    assert body["failed"] == 0


async def subscribe(ws: WsClient, *channels: str) -> None:
    await ws.send_json({"type": "Subscribe", "payload": {"channels": list(channels)}})
    assert (await ws.expect("subscribed"))["payload"] == list(channels)


# -- the six send endpoints ------------------------------------------------------


async def test_send_reports_delivery_to_an_online_user(server: EmbeddedServer) -> None:
    async with server.ws("u1") as first, server.ws("u1") as second:
        body = await server.send_to_user("u1", "e", {"k": 1})
        assert_base_fields(body)
        assert body["success"] is True
        assert body["delivered_to"] == 2
        assert body["queued"] is False
        for ws in (first, second):
            assert (await ws.expect("notification"))["id"] == body["notification_id"]


async def test_send_to_an_offline_user_is_queued(server: EmbeddedServer) -> None:
    body = await server.send_to_user("nobody-home")
    assert_base_fields(body)
    assert body["success"] is True
    assert body["delivered_to"] == 0
    assert body["queued"] is True


async def test_send_to_users_reports_each_user(server: EmbeddedServer) -> None:
    async with server.ws("on") as a, server.ws("on") as b:
        response = await server.post("/api/v1/notifications/send-to-users", {
            "target_user_ids": ["on", "off", "on"], "event_type": "multi", "payload": {},
        })
        body = response.json()
        assert_base_fields(body)
        assert body["success"] is True
        assert body["delivered_to"] == 2
        assert body["results"] == {
            "on": {"delivered": True, "connections": 2},
            "off": {"delivered": False, "queued": True},
        }
        for ws in (a, b):
            await ws.expect("notification")
            await ws.assert_silent(0.1)


async def test_broadcast_reaches_every_connection_of_the_tenant(server: EmbeddedServer) -> None:
    async with server.ws("a") as a, server.ws("b") as b, server.sse("c") as c:
        response = await server.post("/api/v1/notifications/broadcast", {
            "event_type": "maintenance", "payload": {"in": 30}, "priority": "Critical",
        })
        body = response.json()
        assert_base_fields(body)
        assert body["delivered_to"] == 3
        for ws in (a, b):
            frame = await ws.expect("notification")
            assert frame["event_type"] == "maintenance"
            assert "channel" not in frame["metadata"]
        assert (await c.expect("notification")).id == body["notification_id"]


async def test_channel_send_names_the_channel(server: EmbeddedServer) -> None:
    async with server.ws("a") as a, server.ws("b") as b:
        await subscribe(a, "orders")
        response = await server.post("/api/v1/notifications/channel", {
            "channel": "orders", "event_type": "order.created", "payload": {},
        })
        body = response.json()
        assert_base_fields(body)
        assert body["channel"] == "orders"
        assert body["delivered_to"] == 1
        assert (await a.expect("notification"))["metadata"]["channel"] == "orders"
        await b.assert_silent(0.2)


async def test_channels_send_counts_per_channel_and_sends_one_copy_per_connection(
    server: EmbeddedServer,
) -> None:
    async with server.ws("both") as both, server.ws("one") as one:
        await subscribe(both, "orders", "alerts")
        await subscribe(one, "orders")
        response = await server.post("/api/v1/notifications/channels", {
            "channels": ["orders", "alerts", "empty"], "event_type": "multi", "payload": {},
        })
        body = response.json()
        assert_base_fields(body)
        assert body["channels"] == {
            "orders": {"delivered_to": 2}, "alerts": {"delivered_to": 1},
            "empty": {"delivered_to": 0},
        }
        assert body["total_delivered"] == body["delivered_to"]
        assert 2 <= body["total_delivered"] <= 3
        first = await both.expect("notification")
        assert first["metadata"]["channel"] in ("orders", "alerts")
        await both.assert_silent(0.3)
        assert (await one.expect("notification"))["metadata"]["channel"] == "orders"
        await one.assert_silent(0.1)


async def test_batch_reports_every_item_and_a_summary(server: EmbeddedServer) -> None:
    async with server.ws("u1") as ws:
        await subscribe(ws, "news")
        items = [
            {"target": {"type": "user", "value": "u1"}, "event_type": "one", "payload": {}},
            {"target": {"type": "users", "value": ["u1", "u2"]}, "event_type": "two"},
            {"target": {"type": "channel", "value": "news"}, "event_type": "three"},
            {"target": {"type": "channels", "value": ["news", "x"]}, "event_type": "four"},
            {"target": {"type": "broadcast"}, "event_type": "five"},
            {"target": {"type": "user", "value": "u1"}, "priority": "Urgent", "event_type": "e"},
        ]
        response = await server.post("/api/v1/notifications/batch", {"notifications": items})
        assert response.status_code == 200
        body = response.json()
        assert uuid.UUID(body["batch_id"])
        results = body["results"]
        assert [r["index"] for r in results] == list(range(6))
        assert [r["success"] for r in results] == [True] * 5 + [False]
        assert [r["delivered_to"] for r in results] == [1, 1, 1, 1, 1, 0]
        assert all(uuid.UUID(r["notification_id"]) for r in results[:5])
        assert results[5]["error"]["code"] == "VALIDATION_ERROR"
        assert body["summary"] == {
            "total": 6, "succeeded": 5, "failed": 1, "skipped": 0, "total_delivered": 5,
        }
        frames = await ws.notifications(5)
        assert [f["event_type"] for f in frames] == ["one", "two", "three", "four", "five"]
        assert [f["metadata"]["source"] for f in frames] == ["batch"] * 5


async def test_batch_stop_on_error_skips_the_rest(server: EmbeddedServer) -> None:
    items = [
        {"target": {"type": "user", "value": "u1"}, "event_type": "ok"},
        {"target": {"type": "channel", "value": "bad name"}, "event_type": "bad"},
        {"target": {"type": "user", "value": "u1"}, "event_type": "never"},
    ]
    body = (await server.post("/api/v1/notifications/batch", {
        "notifications": items, "options": {"stop_on_error": True},
    })).json()
    assert [r["success"] for r in body["results"]] == [True, False, False]
    assert body["results"][2]["skipped"] is True
    assert body["results"][2]["notification_id"] is None
    assert body["summary"] == {
        "total": 3, "succeeded": 1, "failed": 1, "skipped": 1, "total_delivered": 0,
    }


async def test_batch_deduplicate_sends_identical_items_once(server: EmbeddedServer) -> None:
    item = {"target": {"type": "user", "value": "u1"}, "event_type": "dup", "payload": {"a": 1}}
    reordered = {"payload": {"a": 1}, "event_type": "dup", "target": {"value": "u1",
                                                                      "type": "user"}}
    other = {**item, "payload": {"a": 2}}
    async with server.ws("u1") as ws:
        body = (await server.post("/api/v1/notifications/batch", {
            "notifications": [item, reordered, other], "options": {"deduplicate": True},
        })).json()
        assert body["results"][1]["skipped"] is True
        assert body["summary"]["skipped"] == 1
        assert body["summary"]["succeeded"] == 2
        frames = await ws.notifications(2)
        assert [f["payload"] for f in frames] == [{"a": 1}, {"a": 2}]
        await ws.assert_silent(0.2)
    without = (await server.post("/api/v1/notifications/batch",
                                 {"notifications": [item, item]})).json()
    assert without["summary"]["succeeded"] == 2


# -- errors ----------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_malformed_json_is_400_invalid_json(shared_server: EmbeddedServer) -> None:
    assert shared_server.client is not None
    for content in (b"{oops", b""):
        response = await shared_server.client.post(
            SEND, content=content, headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "INVALID_JSON"


@pytest.mark.asyncio(loop_scope="module")
async def test_non_json_content_type_is_415(shared_server: EmbeddedServer) -> None:
    assert shared_server.client is not None
    response = await shared_server.client.post(
        SEND, content=b"target_user_id=u1", headers={"content-type": "text/plain"},
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"


async def test_send_body_over_64_kib_is_413(server: EmbeddedServer) -> None:
    body = {"target_user_id": "u1", "event_type": "big", "payload": {"x": "y" * 65_536}}
    response = await server.post(SEND, body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    fits = {"target_user_id": "u1", "event_type": "big", "payload": {"x": "y" * 60_000}}
    assert (await server.post(SEND, fits)).status_code == 200


async def test_batch_body_over_1_mib_is_413_but_over_64_kib_is_fine(
    server: EmbeddedServer,
) -> None:
    def batch(size: int) -> dict:
        item = {"target": {"type": "user", "value": "u1"}, "event_type": "e",
                "payload": {"x": "y" * size}}
        return {"notifications": [item] * 20}

    assert (await server.post("/api/v1/notifications/batch", batch(10_000))).status_code == 200
    response = await server.post("/api/v1/notifications/batch", batch(55_000))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.asyncio(loop_scope="module")
async def test_chunked_body_over_the_limit_is_413(shared_server: EmbeddedServer) -> None:
    assert shared_server.client is not None

    async def chunks() -> Any:
        yield b'{"target_user_id":"u1","event_type":"e","payload":"'
        for _ in range(10):
            yield b"z" * 10_000
        yield b'"}'

    response = await shared_server.client.post(SEND, content=chunks(),
                                        headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("path", "body", "field"), [
    (SEND, {"event_type": "e"}, "target_user_id"),
    (SEND, {"target_user_id": "u1"}, "body"),
    (SEND, {"target_user_id": "u1", "event_type": "e", "priority": "Urgent"}, "priority"),
    (SEND, {"target_user_id": "u1", "event_type": "e", "ttl": 0}, "ttl"),
    (SEND, {"target_user_id": "", "event_type": "e"}, "target_user_id"),
    (SEND, {"target_user_id": "u" * 257, "event_type": "e"}, "target_user_id"),
    (SEND, {"target_user_id": "u1", "event_type": "e", "correlation_id": ""}, "correlation_id"),
    (SEND, {"target_user_id": "u1", "event_type": ""}, "event_type"),
    (SEND, {"target_user_id": "u1", "event_type": "e" * 129}, "event_type"),
    (SEND, {"target_user_id": "u1", "event_type": "e", "template_id": "t"}, "body"),
    (SEND, ["not", "an", "object"], "body"),
    ("/api/v1/notifications/send-to-users", {"target_user_ids": [], "event_type": "e"},
     "target_user_ids"),
    ("/api/v1/notifications/channel", {"channel": "no spaces", "event_type": "e"}, "channel"),
    ("/api/v1/notifications/channel", {"channel": "c" * 65, "event_type": "e"}, "channel"),
    ("/api/v1/notifications/channels",
     {"channels": [f"c{i}" for i in range(101)], "event_type": "e"}, "channels"),
    ("/api/v1/notifications/batch", {"notifications": []}, "notifications"),
    ("/api/v1/notifications/batch",
     {"notifications": [{"target": {"type": "user", "value": "u"}, "event_type": "e"}] * 101},
     "notifications"),
])
async def test_invalid_send_is_422_naming_the_field(
    shared_server: EmbeddedServer, path: str, body: Any, field: str,
) -> None:
    response = await shared_server.post(path, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["details"]["field"] == field
    assert error["message"]


@pytest.mark.asyncio(loop_scope="module")
async def test_unknown_route_is_404_with_an_error_body(shared_server: EmbeddedServer) -> None:
    for path in ("/api/v1/nope", "/nothing-here"):
        response = await shared_server.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "NOT_FOUND"
    assert shared_server.client is not None
    wrong_method = await shared_server.client.delete(SEND)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_idempotency_key_repeat_returns_the_first_answer_and_sends_once(
    server: EmbeddedServer,
) -> None:
    body = {"target_user_id": "u1", "event_type": "pay", "payload": {"amount": 5}}
    headers = {"Idempotency-Key": "key-123"}
    async with server.ws("u1") as ws:
        first = await server.post(SEND, body, headers=headers)
        second = await server.post(SEND, body, headers=headers)
        assert first.status_code == second.status_code == 200
        assert second.json() == first.json()
        assert (await ws.expect("notification"))["id"] == first.json()["notification_id"]
        await ws.assert_silent(0.3)
        # The same key on another endpoint is another request.
        other = await server.post("/api/v1/notifications/broadcast",
                                  {"event_type": "pay", "payload": {}}, headers=headers)
        assert other.json()["notification_id"] != first.json()["notification_id"]
        await ws.expect("notification")
        reused = await server.post(SEND, {**body, "payload": {"amount": 6}}, headers=headers)
        assert reused.status_code == 409
        assert reused.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
        fresh = await server.post(SEND, body, headers={"Idempotency-Key": "key-456"})
        assert fresh.json()["notification_id"] != first.json()["notification_id"]
        await ws.expect("notification")


async def test_concurrent_repeats_of_an_idempotency_key_send_once(server: EmbeddedServer) -> None:
    body = {"target_user_id": "u1", "event_type": "race", "payload": {}}
    async with server.ws("u1") as ws:
        responses = await asyncio.gather(*[
            server.post(SEND, body, headers={"Idempotency-Key": "race-1"}) for _ in range(5)
        ])
        assert {r.status_code for r in responses} == {200}
        assert len({r.json()["notification_id"] for r in responses}) == 1
        await ws.expect("notification")
        await ws.assert_silent(0.3)


async def test_idempotent_batch_is_not_run_twice(server: EmbeddedServer) -> None:
    batch = {"notifications": [{"target": {"type": "user", "value": "u1"}, "event_type": "b"}]}
    async with server.ws("u1") as ws:
        first = await server.post("/api/v1/notifications/batch", batch,
                                  headers={"Idempotency-Key": "batch-1"})
        second = await server.post("/api/v1/notifications/batch", batch,
                                   headers={"Idempotency-Key": "batch-1"})
        assert json.dumps(first.json()) == json.dumps(second.json())
        await ws.expect("notification")
        await ws.assert_silent(0.2)
