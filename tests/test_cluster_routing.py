"""Cluster routing across gateway and router processes on real Redis and Postgres."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from cluster_harness import Client, api, running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


async def test_send_on_gateway_b_reaches_client_on_gateway_a(tmp_path):
    async with running_cluster(tmp_path, gateways=2, routers=1) as cluster:
        a, b = cluster.gateways()
        async with Client.connect(a.ws, cluster.token("alice")) as alice, api(b.base) as http:
            response = await http.post("/api/v1/notifications/send", json={
                "target_user_id": "alice", "event_type": "order.created", "payload": {"n": 1}})
            body = response.json()
            assert response.status_code == 200, body
            assert body["delivered_to"] == 1 and body["queued"] is False
            [got] = await alice.notifications(1)
            assert got["id"] == body["notification_id"]
            assert got["payload"] == {"n": 1}


async def test_channel_and_broadcast_reach_clients_on_every_gateway(tmp_path):
    async with running_cluster(tmp_path, gateways=2, routers=1) as cluster:
        a, b = cluster.gateways()
        async with (
            Client.connect(a.ws, cluster.token("u1")) as c1,
            Client.connect(b.ws, cluster.token("u2")) as c2,
            Client.connect(b.ws, cluster.token("u3")) as c3,
            api(a.base) as http,
        ):
            for client in (c1, c2):
                await client.send({"type": "Subscribe", "payload": {"channels": ["orders"]}})
                assert (await client.recv())["type"] == "subscribed"
            await asyncio.sleep(0.2)
            channel = (await http.get("/api/v1/channels/orders")).json()
            assert channel["subscriber_count"] == 2 and sorted(channel["nodes"]) == sorted(
                [a.node_id, b.node_id])
            sent = (await http.post("/api/v1/notifications/channel", json={
                "channel": "orders", "event_type": "o"})).json()
            assert sent["delivered_to"] == 2
            for client in (c1, c2):
                [got] = await client.notifications(1)
                assert got["id"] == sent["notification_id"]
                assert got["metadata"]["channel"] == "orders"
            assert await c3.notifications(1, timeout=0.5) == []
            sent = (await http.post("/api/v1/notifications/broadcast", json={
                "event_type": "maintenance"})).json()
            assert sent["delivered_to"] == 3
            for client in (c1, c2, c3):
                [got] = await client.notifications(1)
                assert got["id"] == sent["notification_id"]


async def test_offline_user_gets_queued_events_in_order_on_another_gateway(tmp_path):
    async with running_cluster(tmp_path, gateways=2, routers=1) as cluster:
        a, b = cluster.gateways()
        async with Client.connect(a.ws, cluster.token("bob")):
            pass
        ids = []
        async with api(a.base) as http:
            for i in range(20):
                body = (await http.post("/api/v1/notifications/send", json={
                    "target_user_id": "bob", "event_type": "e", "payload": {"i": i}})).json()
                assert body["success"] and body["queued"] is True
                ids.append(body["notification_id"])
        await asyncio.sleep(0.5)
        async with Client.connect(b.ws, cluster.token("bob")) as bob:
            got = await bob.notifications(20)
            assert [g["id"] for g in got] == ids
            assert [g["payload"]["i"] for g in got] == list(range(20))


async def test_pubsub_trigger_is_dispatched_exactly_once_with_two_gateways_and_two_routers(
    tmp_path,
):
    async with running_cluster(tmp_path, gateways=2, routers=2) as cluster:
        a, b = cluster.gateways()
        r = aioredis.Redis.from_url(cluster.redis_url)
        try:
            async with (
                Client.connect(a.ws, cluster.token("carol")) as on_a,
                Client.connect(b.ws, cluster.token("carol")) as on_b,
            ):
                await asyncio.sleep(1.5)  # leader elected and subscribed
                for i in range(5):
                    receivers = await r.publish("notification:user:carol", json.dumps({
                        "type": "user", "target": "carol",
                        "event": {"event_type": "pubsub.test", "payload": {"i": i}}}))
                    assert receivers == 1, "exactly one router must be subscribed"
                await r.publish("notification:user:carol", b"{not json")
                got_a = await on_a.notifications(5)
                got_b = await on_b.notifications(5)
                assert [g["payload"]["i"] for g in got_a] == list(range(5))
                assert [g["id"] for g in got_a] == [g["id"] for g in got_b]
                assert got_a[0]["metadata"]["source"] == "redis:notification:user:carol"
                assert await on_a.notifications(1, timeout=1.0) == []
        finally:
            await r.aclose()


async def test_per_user_connection_limit_is_cluster_wide(tmp_path):
    env = {"WEBSOCKET_MAX_CONNECTIONS_PER_USER": "3"}
    async with running_cluster(tmp_path, gateways=2, routers=0, env=env) as cluster:
        a, b = cluster.gateways()
        token = cluster.token("dave")
        async with Client.connect(a.ws, token), Client.connect(b.ws, token), \
                Client.connect(a.ws, token):
            import websockets

            async with websockets.connect(f"{b.ws}?token={token}") as ws:
                error = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert error == {"type": "error", "code": "CONNECTION_LIMIT",
                                 "message": "per-user connection limit reached"}
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd.code == 4029


async def test_cluster_status_and_user_lookup_show_sessions_on_their_gateways(tmp_path):
    async with running_cluster(tmp_path, gateways=2, routers=2) as cluster:
        a, b = cluster.gateways()
        async with (
            Client.connect(a.ws, cluster.token("erin")) as e1,
            Client.connect(b.ws, cluster.token("erin")),
            api(b.base) as http,
        ):
            await e1.send({"type": "Subscribe", "payload": {"channels": ["news"]}})
            await e1.recv()
            await asyncio.sleep(0.2)
            status = (await http.get("/api/v1/cluster/status")).json()
            assert status["healthy_nodes"] == 2
            assert {n["node_id"] for n in status["nodes"]} == {a.node_id, b.node_id}
            routers = [r for r in status["routers"] if r["status"] == "healthy"]
            assert len(routers) == 2
            parts = [set(r["partitions"]) for r in routers]
            assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == status["partitions"]
            user = (await http.get("/api/v1/cluster/users/erin")).json()
            assert user["found"] is True
            nodes = sorted(s["node_id"] for s in user["sessions"])
            assert nodes == sorted([a.node_id, b.node_id])
            assert ["news"] in [s["channels"] for s in user["sessions"]]
            missing = (await http.get("/api/v1/cluster/users/nobody")).json()
            assert missing == {"user_id": "nobody", "found": False, "sessions": []}
