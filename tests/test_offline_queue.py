"""Offline queue and mailbox: replay order, bounds, ttl, restarts, guarantees (PROTOCOL §2)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from conftest import (
    EmbeddedServer,
    ServerFactory,
    eventually,
    ws_connect_stalled,
)

from common.backends.base import MailboxPut
from common.protocol import Notification


async def queue_for(server: EmbeddedServer, user: str, count: int, **extra: Any) -> list[str]:
    """Send ``count`` notifications to ``user`` (offline), numbered in ``payload.n``."""
    ids = []
    for n in range(count):
        body = await server.send_to_user(user, "queued", {"n": n}, **extra)
        assert body["queued"] is True
        ids.append(body["notification_id"])
    return ids


async def test_queued_events_are_replayed_oldest_first_on_connect(server: EmbeddedServer) -> None:
    ids = await queue_for(server, "u1", 5)
    async with server.ws("u1") as ws:
        frames = await ws.notifications(5)
        assert [f["id"] for f in frames] == ids
        assert [f["payload"]["n"] for f in frames] == list(range(5))
        assert all("redelivered" not in f["metadata"] for f in frames)
        await ws.assert_silent(0.2)


async def test_replay_comes_before_live_traffic(server_factory: ServerFactory) -> None:
    server = await server_factory(queue_max_size_per_user=1000, websocket_send_queue_size=16)
    queued = 400
    blob = "q" * 20_000
    notifications = [
        Notification.create("default", "queued", {"n": n, "blob": blob}, default_ttl=3600)
        for n in range(queued)
    ]
    await server.node.backends.mailbox.put([MailboxPut("u1", n, False) for n in notifications])
    # The client reads nothing at first, so the 8 MB replay is still running when the
    # live notification is sent.
    async with ws_connect_stalled(server.ws_url(server.token("u1"))) as ws:
        await eventually(lambda: len(server.node.manager) == 1)
        [conn] = server.node.manager
        live = await server.send_to_user("u1", "live", {"n": "live"})
        assert live["delivered_to"] == 1
        assert conn.replaying, "the live send did not overlap the replay"
        assert (await ws.expect("connected"))["user_id"] == "u1"
        frames = await ws.notifications(queued + 1, within=20)
        assert [f["payload"]["n"] for f in frames] == [*range(queued), "live"]
        assert frames[-1]["id"] == live["notification_id"]
        await ws.assert_silent(0.2)


async def test_queue_keeps_only_the_newest_per_user(server_factory: ServerFactory) -> None:
    server = await server_factory(queue_max_size_per_user=3)
    ids = await queue_for(server, "u1", 5)
    await queue_for(server, "u2", 2)
    async with server.ws("u1") as ws:
        frames = await ws.notifications(3)
        assert [f["id"] for f in frames] == ids[2:]
        await ws.assert_silent(0.2)
    async with server.ws("u2") as ws:
        assert len(await ws.notifications(2)) == 2


async def test_queued_events_are_dropped_at_their_ttl(server_factory: ServerFactory) -> None:
    server = await server_factory(queue_message_ttl_seconds=1)
    await server.send_to_user("u1", "short", ttl=1)
    await server.send_to_user("u1", "default-ttl")
    kept = await server.send_to_user("u1", "long", ttl=60)
    await asyncio.sleep(1.2)
    async with server.ws("u1") as ws:
        frame = await ws.expect("notification")
        assert frame["id"] == kept["notification_id"]
        assert frame["metadata"]["ttl"] == 60
        await ws.assert_silent(0.2)


async def test_channel_and_broadcast_events_are_not_queued(server: EmbeddedServer) -> None:
    await server.post("/api/v1/notifications/broadcast", {"event_type": "b", "payload": {}})
    await server.post("/api/v1/notifications/channel",
                      {"channel": "news", "event_type": "c", "payload": {}})
    async with server.sse("u1", channels="news") as sse:
        await server.send_to_user("u1", "marker")
        assert (await sse.expect("notification")).data["event_type"] == "marker"


async def test_queue_disabled_does_not_store_offline_events(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(queue_enabled=False)
    body = await server.send_to_user("u1")
    assert body["queued"] is False
    assert body["success"] is False
    async with server.ws("u1") as ws:
        await ws.assert_silent(0.3)


async def test_queue_survives_a_restart_of_the_in_process_server(
    server_factory: ServerFactory,
) -> None:
    first = await server_factory()
    ids = await queue_for(first, "u1", 3)
    created = await first.post("/api/v1/templates", {"id": "t", "event_type": "e"})
    assert created.status_code == 201
    await first.stop()
    second = await server_factory()
    assert second.settings.sqlite_path == first.settings.sqlite_path
    async with second.ws("u1") as ws:
        frames = await ws.notifications(3)
        assert [f["id"] for f in frames] == ids
    assert (await second.get("/api/v1/templates/t")).status_code == 200


async def test_queue_survives_kill_9_of_the_serve_process(serve_process: Any) -> None:
    proc = await serve_process()
    async with proc.http() as http:
        sent = []
        for n in range(3):
            response = await http.post("/api/v1/notifications/send", json={
                "target_user_id": "u1", "event_type": "durable", "payload": {"n": n}})
            assert response.json()["queued"] is True
            sent.append(response.json()["notification_id"])
    await proc.kill()
    again = await serve_process(port=proc.port)
    async with again.ws("u1") as ws:
        frames = await ws.notifications(3)
        assert [f["id"] for f in frames] == sent


async def test_unacked_notification_is_redelivered_and_acked_one_is_not(
    server: EmbeddedServer,
) -> None:
    async with server.ws("u1") as ws:
        acked = await server.send_to_user("u1", "acked")
        unacked = await server.send_to_user("u1", "unacked")
        frames = await ws.notifications(2)
        assert all("redelivered" not in f["metadata"] for f in frames)
        await ws.ack(acked["notification_id"])
        await ws.expect("acked")
    async with server.ws("u1") as ws:
        frame = await ws.expect("notification")
        assert frame["id"] == unacked["notification_id"]
        assert frame["metadata"]["redelivered"] is True
        await ws.assert_silent(0.2)
        await ws.ack(frame["id"])
        await ws.expect("acked")
    async with server.ws("u1") as ws:
        await ws.assert_silent(0.3)


async def test_replayed_but_unacked_notification_is_marked_redelivered_next_time(
    server: EmbeddedServer,
) -> None:
    [queued] = await queue_for(server, "u1", 1)
    async with server.ws("u1") as ws:
        first = await ws.expect("notification")
        assert first["id"] == queued
        assert "redelivered" not in first["metadata"]
    async with server.ws("u1") as ws:
        again = await ws.expect("notification")
        assert again["id"] == queued
        assert again["metadata"]["redelivered"] is True


async def test_ack_from_one_device_clears_the_mailbox_for_all(server: EmbeddedServer) -> None:
    async with server.ws("u1") as phone, server.sse("u1") as laptop:
        sent = await server.send_to_user("u1")
        await phone.expect("notification")
        await laptop.expect("notification")
        await phone.ack(sent["notification_id"])
        await phone.expect("acked")
    async with server.ws("u1") as ws:
        await ws.assert_silent(0.3)


async def test_at_most_once_does_not_replay_what_was_delivered(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(delivery_guarantee="at-most-once")
    async with server.ws("u1") as ws:
        live = await server.send_to_user("u1", "live")
        assert live["queued"] is False
        assert (await ws.expect("notification"))["id"] == live["notification_id"]
    await eventually(lambda: len(server.node.manager) == 0)
    [queued] = await queue_for(server, "u1", 1)
    async with server.ws("u1") as ws:
        frame = await ws.expect("notification")
        assert frame["id"] == queued
        assert "redelivered" not in frame["metadata"]
        await ws.assert_silent(0.2)
    async with server.ws("u1") as ws:
        await ws.assert_silent(0.3)


async def test_long_queue_drains_fully_in_order_without_slow_consumer_close(
    server_factory: ServerFactory,
) -> None:
    total = 5000
    server = await server_factory(queue_max_size_per_user=total, websocket_send_queue_size=32)
    notifications = [
        Notification.create("default", "bulk", {"n": n}, default_ttl=3600) for n in range(total)
    ]
    await server.node.backends.mailbox.put([MailboxPut("u1", n, False) for n in notifications])
    assert await server.node.backends.mailbox.depth() == total
    started = time.monotonic()
    async with server.ws("u1") as ws:
        frames = await ws.notifications(total, within=30)
        assert [f["payload"]["n"] for f in frames] == list(range(total))
        live = await server.send_to_user("u1", "after")
        assert (await ws.expect("notification"))["id"] == live["notification_id"]
        await ws.send_json({"type": "Ping"})
        assert (await ws.recv())["type"] == "pong"
    assert ws.close_code in (None, 1000)
    assert time.monotonic() - started < 30


async def test_no_event_is_lost_or_reordered_while_the_user_connects(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(queue_max_size_per_user=1000)
    sent: list[str] = []
    total = 300

    async def produce() -> None:
        for n in range(total):
            sent.append((await server.send_to_user("u1", "flow", {"n": n}))["notification_id"])

    producer = asyncio.create_task(produce())
    await eventually(lambda: len(sent) >= 50)
    async with server.ws("u1") as ws:
        await asyncio.wait_for(producer, 30)
        frames = await ws.notifications(total, within=20)
        assert [f["id"] for f in frames] == sent
        await ws.assert_silent(0.2)


async def test_queues_are_per_tenant(server_factory: ServerFactory) -> None:
    server = await server_factory(tenant_enabled=True)
    response = await server.post(
        "/api/v1/notifications/send",
        {"target_user_id": "u1", "event_type": "acme-only", "payload": {}},
        headers={"X-Tenant-ID": "acme"},
    )
    assert response.json()["queued"] is True
    async with server.ws("u1") as other_tenant:
        await other_tenant.assert_silent(0.3)
    async with server.ws("u1", tenant="acme") as acme:
        assert (await acme.expect("notification"))["event_type"] == "acme-only"
