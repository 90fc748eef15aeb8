"""Product features hold cluster-wide: idempotency, rate limits, templates, stats, receipts."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
import redis.asyncio as aioredis
import websockets
from cluster_harness import Client, api, running_cluster

from common.ring import partition_of

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


async def test_idempotency_key_repeated_on_another_gateway_delivers_once(tmp_path):
    async with running_cluster(tmp_path, gateways=2, routers=1) as cluster:
        a, b = cluster.gateways()
        body = {"target_user_id": "ida", "event_type": "charge", "payload": {"amount": 5}}
        headers = {"Idempotency-Key": "charge-42"}
        async with Client.connect(a.ws, cluster.token("ida")) as ida, \
                api(a.base) as on_a, api(b.base) as on_b:
            first = await on_a.post("/api/v1/notifications/send", json=body, headers=headers)
            second = await on_b.post("/api/v1/notifications/send", json=body, headers=headers)
            assert first.status_code == second.status_code == 200
            assert first.json() == second.json()
            other = await on_b.post("/api/v1/notifications/send",
                                    json={**body, "payload": {"amount": 6}}, headers=headers)
            assert other.status_code == 409
            assert other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
            got = await ida.notifications(2, timeout=2)
            assert [g["id"] for g in got] == [first.json()["notification_id"]]


async def test_rest_rate_limit_is_shared_by_all_gateways(tmp_path):
    env = {"RATELIMIT_ENABLED": "true", "RATELIMIT_HTTP_REQUESTS_PER_SECOND": "0.5",
           "RATELIMIT_HTTP_BURST_SIZE": "4", "RATELIMIT_WS_CONNECTIONS_PER_MINUTE": "1000"}
    async with running_cluster(tmp_path, gateways=2, routers=0, env=env) as cluster:
        a, b = cluster.gateways()
        statuses = []
        async with api(a.base) as on_a, api(b.base) as on_b:
            for i in range(6):
                client = on_a if i % 2 == 0 else on_b
                response = await client.get("/api/v1/channels")
                statuses.append(response.status_code)
                if response.status_code == 429:
                    limited = response
        assert statuses[:4] == [200, 200, 200, 200] and statuses[4:] == [429, 429]
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.headers["x-ratelimit-limit"] == "4"
        error = limited.json()["error"]
        assert error["code"] == "RATE_LIMITED" and error["details"]["retry_after_seconds"] >= 1


async def test_websocket_connect_rate_limit_is_per_user_across_gateways(tmp_path):
    env = {"RATELIMIT_ENABLED": "true", "RATELIMIT_WS_CONNECTIONS_PER_MINUTE": "2",
           "RATELIMIT_HTTP_REQUESTS_PER_SECOND": "1000", "RATELIMIT_HTTP_BURST_SIZE": "1000"}
    async with running_cluster(tmp_path, gateways=2, routers=0, env=env) as cluster:
        a, b = cluster.gateways()
        token = cluster.token("hasty")
        async with Client.connect(a.ws, token), Client.connect(b.ws, token):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"{a.ws}?token={token}"):
                    pass
            assert refused.value.response.status_code == 429
            body = json.loads(refused.value.response.body)
            assert body["error"]["code"] == "RATE_LIMITED"
        async with Client.connect(b.ws, cluster.token("calm")):
            pass


async def test_templates_receipts_and_stats_are_shared_by_every_gateway(tmp_path):
    async with running_cluster(tmp_path, gateways=2, routers=1) as cluster:
        a, b = cluster.gateways()
        async with Client.connect(b.ws, cluster.token("tess")) as tess, \
                api(a.base) as on_a, api(b.base) as on_b:
            created = await on_a.post("/api/v1/templates", json={
                "id": "shipped", "event_type": "order.shipped",
                "payload_template": {"order": "{{ order.id }}", "total": "{{total}}"}})
            assert created.status_code == 201
            sent = await on_b.post("/api/v1/notifications/send", json={
                "target_user_id": "tess", "template_id": "shipped",
                "variables": {"order": {"id": "ORD-9"}, "total": 12.5}})
            assert sent.status_code == 200, sent.text
            [got] = await tess.notifications(1)
            assert got["event_type"] == "order.shipped"
            assert got["payload"] == {"order": "ORD-9", "total": 12.5}
            await tess.send({"type": "Ack", "payload": {"notification_id": got["id"]}})
            assert (await tess.recv())["type"] == "acked"
            receipt = (await on_a.get(f"/api/v1/notifications/{got['id']}")).json()
            assert [r["user_id"] for r in receipt["acked_by"]] == ["tess"]
            assert receipt["pending"] == [] and receipt["delivered_to"] == 1
            await on_a.post("/api/v1/notifications/send", json={
                "target_user_id": "nobody-home", "event_type": "x"})
            await asyncio.sleep(1.5)  # counters are flushed to Redis once a second
            for client in (on_a, on_b):
                stats = (await client.get("/api/v1/stats")).json()
                assert stats["notifications"]["sent"] == 2
                assert stats["notifications"]["queued"] == 1
                assert stats["connections"]["websocket"] == 1
                assert stats["acks"]["acknowledged"] == 1


async def test_per_tenant_connection_limit_counts_every_gateway(tmp_path):
    env = {"WEBSOCKET_MAX_CONNECTIONS_PER_TENANT": "2", "TENANT_ENABLED": "true"}
    async with running_cluster(tmp_path, gateways=2, routers=0, env=env) as cluster:
        a, b = cluster.gateways()
        async with Client.connect(a.ws, cluster.token("t1", tenant="acme")), \
                Client.connect(b.ws, cluster.token("t2", tenant="acme")):
            await asyncio.sleep(0.2)
            third = cluster.token("t3", tenant="acme")
            async with websockets.connect(f"{a.ws}?token={third}") as ws:
                error = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert error["code"] == "CONNECTION_LIMIT"
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
                assert ws.close_code == 4029
            async with Client.connect(b.ws, cluster.token("t1", tenant="other")):
                pass


async def test_a_receipt_reads_right_after_the_send_and_the_router_then_writes_it(tmp_path):
    async with running_cluster(tmp_path, gateways=2, routers=0) as cluster:
        a, b = cluster.gateways()
        redis = aioredis.from_url(cluster.redis_url)
        pg = await asyncpg.connect(cluster.database_url)
        try:
            async with api(a.base) as on_a, api(b.base) as on_b:
                sent = await on_a.post("/api/v1/notifications/send", json={
                    "target_user_id": "rita", "event_type": "x"})
                nid = sent.json()["notification_id"]
                # No router runs yet: the other gateway answers from the pending record.
                early = await on_b.get(f"/api/v1/notifications/{nid}")
                assert early.status_code == 200, early.text
                assert early.json()["delivered_to"] == 0 and early.json()["pending"] == ["rita"]
                assert await pg.fetchval(
                    "SELECT count(*) FROM ara_receipts WHERE notification_id = $1", nid) == 0
                assert (await on_b.get("/api/v1/notifications/" + "0" * 32)).status_code == 404
                key = f"{cluster.prefix}:rcpt:{{{partition_of('default', 'rita', 64):04d}}}:{nid}"
                assert await redis.exists(key)
                # The router writes the receipt with the mailbox row, then drops the record.
                cluster.start("router")
                await cluster.wait_routed()
                for _ in range(100):
                    if not await redis.exists(key):
                        break
                    await asyncio.sleep(0.1)
                assert not await redis.exists(key)
                assert await pg.fetchval(
                    "SELECT count(*) FROM ara_receipts WHERE notification_id = $1", nid) == 1
                async with Client.connect(a.ws, cluster.token("rita")) as rita:
                    [got] = await rita.notifications(1)
                    assert got["id"] == nid
                    await rita.send({"type": "Ack", "payload": {"notification_id": nid}})
                    assert (await rita.recv())["type"] == "acked"
                receipt = (await on_b.get(f"/api/v1/notifications/{nid}")).json()
                assert [r["user_id"] for r in receipt["acked_by"]] == ["rita"]
                # Split over several partitions no router sees it whole: the gateway writes
                # its receipt before answering, every user in it.
                users = [f"u{i}" for i in range(20)]
                many = await on_a.post("/api/v1/notifications/send-to-users", json={
                    "target_user_ids": users, "event_type": "x"})
                many_id = many.json()["notification_id"]
                assert await pg.fetchval(
                    "SELECT count(*) FROM ara_receipt_users WHERE notification_id = $1",
                    many_id) == 20
                assert not await redis.keys(f"{cluster.prefix}:rcpt:*:{many_id}")
                assert (await on_b.get(f"/api/v1/notifications/{many_id}")).json()[
                    "pending"] == users
        finally:
            await pg.close()
            await redis.aclose()
